"""Checkpoints that are safe to load (tensors and plain data, read with weights_only=True), refuse a
damaged file (a SHA-256 of the content), are never half-written, and from an older format are
upgraded on load (docs/methods.md)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import tempfile
import warnings

import numpy as np
import torch

from .errors import UserError

FORMAT = "busseg-checkpoint/2"
# /1: a flat config, and every U-Net and DeepLab with both methods' heads (upgraded on load).
FORMAT_V1 = "busseg-checkpoint/1"


def _digest(obj, h) -> None:
    """Feed a canonical form of plain data and tensors to the hash `h` (insertion order kept:
    torch.load restores dicts in the order they were saved)."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint: {type(obj).__name__} is not a tensor or plain data")


def digest(state: dict) -> str:
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def write_atomic(path: str, write) -> None:
    """write(file) into a temporary file beside `path`, fsynced, then renamed over it: `path` is
    never half-written (checkpoints, exports)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(state: dict, path: str) -> None:
    """Write `state` (tensors and plain data only: anything else is a TypeError) with its digest."""
    payload = {"format": FORMAT, **state}
    payload["sha256"] = digest(payload)
    write_atomic(path, lambda f: torch.save(payload, f))


def read_plain(path: str, what: str = "checkpoint"):
    """torch.load with weights_only=True; every failure is a one-line UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them: we say why
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = " ".join(str(err).split())
        if "Unsupported global" in text or ("Weights only load failed" in text and _is_pickle(path)):
            raise UserError(
                f"{what} {path}: refused: it holds objects other than tensors and plain data, "
                "which could run code when unpickled"
            ) from None
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {path}: not a PyTorch checkpoint, or damaged ({first})") from None


def _is_pickle(path: str) -> bool:
    """Whether the file is a pickle (not torch's zip format): its first bytes are pickle's PROTO
    opcode with a protocol number. Any other content that torch cannot read is damaged, not a threat."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def load(path: str) -> dict:
    """A checkpoint written by `save`, its digest verified, in the current layout (an older one
    upgraded): at least "config" (TrainConfig values, the groups nested) and "teacher" / "student"
    (state dicts)."""
    obj = read_plain(path)
    version = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(version, str) and version.startswith("busseg-checkpoint/") and version not in (FORMAT, FORMAT_V1):
        raise UserError(
            f"checkpoint {path}: written as {version}, which this busseg cannot read ({FORMAT} and {FORMAT_V1}); "
            "use the busseg that wrote it"
        )
    if version not in (FORMAT, FORMAT_V1) or "sha256" not in obj:
        raise UserError(
            f"checkpoint {path}: not a busseg training checkpoint (no {FORMAT} header; an exported model, "
            "another program's file, or one written before checkpoints were checksummed)"
        )
    stored = obj.pop("sha256")
    try:
        actual = digest(obj)
    except TypeError:
        actual = None
    if actual != stored:
        raise UserError(f"checkpoint {path}: checksum mismatch, the file is corrupted; use another checkpoint")
    obj.pop("format")
    require(obj, ("config",), path)
    if version == FORMAT_V1:
        _upgrade_v1(obj, path)
    for key, before in SETTINGS_ADDED_SINCE_V2.items():  # the value it trained with
        obj["config"].setdefault(key, before)
    return obj


def _upgrade_v1(obj: dict, path: str) -> None:
    """A busseg-checkpoint/1 in place as /2: its flat config with the settings added since at the
    values it trained with, the groups nested; the heads its method does not use (every U-Net and
    DeepLab had PH-Net's projector and RA-BUSSeg's relation projection) dropped from the networks
    and, with their optimizer state, from the optimizer."""
    from . import config, methods

    flat = obj["config"]
    # checkpoints from before the dropout setting existed trained without dropout; before split_mode,
    # the split followed from the data (the default, None)
    flat.setdefault("dropout", False)
    # before encoder_dropout, --dropout also put the SSL4MIS encoder dropout into the U-Net
    flat.setdefault("encoder_dropout", flat["dropout"])
    # checkpoints from before issue 30's upstream defaults keep the behaviour they trained with
    for key, before in ISSUE_30_DEFAULTS_BEFORE.items():
        flat.setdefault(key, before)
    flat.setdefault("split_mode", None)
    obj["config"] = config.nested(flat)
    student = obj.get("student")
    if not isinstance(student, dict) or not any(k.startswith(V1_HEADS) for k in student):
        return
    cfg = config.TrainConfig.from_dict(obj["config"], source=f"checkpoint {path}")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the layout alone: no weights, no draws
        keep = set(methods.get(cfg.method).build_model(cfg).state_dict())
    unused = {k for k in student if k.startswith(V1_HEADS) and k not in keep}
    if isinstance(obj.get("optimizer"), dict):
        names = parameter_names(student)
        obj["optimizer"] = renumber_optimizer(obj["optimizer"], names, [n for n in names if n not in unused], path)
    for which in ("student", "teacher"):
        if isinstance(obj.get(which), dict):
            obj[which] = {k: v for k, v in obj[which].items() if k not in unused}


V1_HEADS = ("heads.rep_head.", "heads.proj_head.")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # the networks' only saved buffers (BatchNorm)


def parameter_names(state: dict) -> list:
    """The parameters of a network's state dict, in the order its parameters() gives them."""
    return [k for k in state if k.rsplit(".", 1)[-1] not in _BUFFERS]


def renumber_optimizer(opt: dict, names_from: list, names_to: list, path: str) -> dict:
    """The optimizer state dict `opt` of the network parameters `names_from` (the method's own
    follow, unnamed) for the parameters `names_to`: a parameter's state moves with its name, one
    that `names_from` lacks starts without state, one that `names_to` lacks is dropped."""
    if len(opt.get("param_groups", [])) != 1:
        raise UserError(f"checkpoint {path}: expected one optimizer parameter group")
    group = opt["param_groups"][0]
    extra = len(group["params"]) - len(names_from)
    if extra < 0:
        raise UserError(f"checkpoint {path}: its optimizer holds fewer parameters than its network")
    position = {name: j for j, name in enumerate(names_to)}
    new_index = {i: position[name] for i, name in zip(group["params"], names_from) if name in position}
    new_index.update({i: len(names_to) + e for e, i in enumerate(group["params"][len(names_from) :])})
    state = {new_index[i]: v for i, v in opt.get("state", {}).items() if i in new_index}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(names_to) + extra))}]}


# Settings added after busseg-checkpoint/2, with the behaviour of the code before them.
SETTINGS_ADDED_SINCE_V2 = {"unet_rep_stride": 1}
# The settings issue 30 added, at the values that reproduce the training step before them.
ISSUE_30_DEFAULTS_BEFORE = {"teacher_train_mode": False, "unsup_form": "paper", "apa_mix": "ramp", "ohem_scale": False}


# What each use of a checkpoint reads (a hand-edited file can pass the checksum: its digest recomputed).
TRAINING_KEYS = (
    "config",
    "student",
    "teacher",
    "optimizer",
    "scheduler",
    "method",
    "epoch",
    "step_in_epoch",
    "global_step",
    "best",
    "rng",
)


def require(st: dict, keys, path: str) -> None:
    """Each of `keys` is in the checkpoint with the right kind of value; otherwise a one-line error
    naming the first one that is not."""
    kinds = {"config": dict, "student": dict, "teacher": dict, "optimizer": dict, "scheduler": dict, "method": dict}
    kinds.update(epoch=int, step_in_epoch=int, global_step=int, best=(int, float), rng=dict)
    for key in keys:
        if key not in st:
            raise UserError(f"checkpoint {path}: no {key!r} entry (edited, or not written by busseg train)")
        if not isinstance(st[key], kinds.get(key, object)) or isinstance(st[key], bool):
            raise UserError(f"checkpoint {path}: its {key!r} entry is a {type(st[key]).__name__}, not as written")
    for key in ("student", "teacher"):
        if key in keys:
            bad = next((k for k, v in st[key].items() if not torch.is_tensor(v)), None)
            if bad is not None:
                raise UserError(f"checkpoint {path}: {key} entry {bad!r} is not a tensor")


def check_progress(st: dict, path: str = "--resume") -> None:
    """The counters of a training checkpoint are possible (a hand-edited `epoch: -5` must not resume)."""
    for key in ("epoch", "step_in_epoch", "global_step"):
        if st[key] < 0:
            raise UserError(f"checkpoint {path}: {key} {st[key]} is negative")
    if st["step_in_epoch"] > st["global_step"]:
        raise UserError(
            f"checkpoint {path}: step_in_epoch {st['step_in_epoch']} exceeds global_step {st['global_step']}"
        )
    best = st["best"]
    if not (best == -1 or 0 <= best <= 1):
        raise UserError(f"checkpoint {path}: best validation Dice {best} is not in [0, 1]")


def check_finite(weights: dict, path: str, which: str = "teacher") -> None:
    """Every floating tensor of a state dict is finite: a NaN network would be scored as Dice 0."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"checkpoint {path}: the {which}'s weights hold NaN or infinite values ({len(bad)} tensors, e.g. "
            f"{bad[0]!r}); use an earlier checkpoint"
        )


def rng_state() -> dict:
    """Every RNG as tensors and lists (weights_only-loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopGuard:
    """While active, SIGINT/SIGTERM only set `requested`; the loop saves and stops at the next step
    boundary. A second signal restores the handlers found on entry (by default: Ctrl-C twice still
    kills). Inside another StopGuard (reproduce's pool keeps one around each whole run), a stop
    asked of the outer one before this one began is asked of this one too."""

    _active: list[StopGuard] = []  # the guards entered and not yet left, innermost last

    def __init__(self):
        self._requested = False
        self._old = {}
        self._outer = None

    @property
    def requested(self) -> bool:
        return self._requested or (self._outer is not None and self._outer.requested)

    def _handler(self, signum, frame):
        self._requested = True
        for s, h in self._old.items():
            signal.signal(s, h)

    def __enter__(self):
        self._outer = StopGuard._active[-1] if StopGuard._active else None
        StopGuard._active.append(self)
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: no handlers, never requested
            self._old = {}
        return self

    def __exit__(self, *exc):
        StopGuard._active.remove(self)
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
