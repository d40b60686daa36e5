"""Training configuration: `TrainConfig`, the settings every method reads and one group per method
(methods/), read from flags, our config files (flat or nested) or upstream's nested layout, and the
shipped presets. Defaults follow the public RA-BUSSeg/U2PL code where it and a paper disagree."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

from . import methods
from .errors import UserError
from .settings import check, flag, setting

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# The help sections of the settings that every method reads; each method's own are in its group.
SECTIONS = {
    "run": "method and run",
    "data": "data",
    "augment": "augmentation (per sample, as upstream: scale the original, flip, crop)",
    "model": "model",
    "optim": "optimisation and losses",
}
METHODS = {name: method.summary for name, method in methods.METHODS.items()}  # name: the sentence --help shows
GROUPS = {**SECTIONS, **{key: group.title for key, group in methods.GROUPS.items()}}


def _f(default, section: str, help: str, choices=None, **ranges):
    return setting(default, help, choices, section=section, **ranges)


def _group(settings):
    return field(default_factory=settings)


@dataclass(init=False)
class TrainConfig:
    # run
    method: str = _f("suponly", "run", "training method (listed above)", tuple(METHODS))
    out: str = _f("runs/train", "run", "output folder (checked writable before the first step)")
    seed: int = _f(
        0,
        "run",
        "seed of the split, the partition, the augmentation and the methods' draws",
        at_least=0,
        at_most=(2**63 - 1, "a 64-bit seed"),
    )
    device: str = _f("cpu", "run", "cpu, cuda or cuda:N")
    num_workers: int = _f(0, "run", "data-loader worker processes", at_least=0, at_most=(256, "worker processes"))
    overlays: int = _f(8, "run", "test overlays (pictures) written at the end", at_least=0)
    quiet: bool = _f(False, "run", "no progress bars, even on a terminal (the per-epoch lines stay)")
    amp: str = _f(
        "off",
        "run",
        "mixed precision of the training forward passes (torch.autocast; weights, optimizer and evaluation stay "
        "float32): bf16 (CPU and CUDA) or fp16 (CUDA only, with a GradScaler)",
        ("off", "bf16", "fp16"),
    )
    channels_last: bool = _f(
        False,
        "run",
        "keep the student and the teacher in channels-last memory format (oneDNN / tensor-core convolutions)",
    )
    compile: bool = _f(
        False, "run", "torch.compile the student's and the teacher's forward (the first steps take longer: compiling)"
    )
    # data
    data: str = _f("synthetic", "data", "dataset layout", ("synthetic", "busi", "udiat", "folder"))
    root: str | None = _f(
        None,
        "data",
        "dataset folder: busi <class>/<class> (N).png + _mask*.png (or upstream's image/ + label/), udiat "
        "original/ + GT/ (or image/ + label/), folder: the images",
    )
    split_mode: str | None = _f(
        None,
        "data",
        "how the images are split: lists (test.txt, 1_2/labeled.txt, 1_2/unlabeled.txt in --split-dir) or random "
        "(a seeded 8:1:1 train/val/test split); none: lists for busi (<root>/splits) and wherever --split-dir is "
        "given, random otherwise",
        ("lists", "random"),
    )
    split_dir: str | None = _f(
        None,
        "data",
        "folder of the split lists test.txt, 1_2/labeled.txt, 1_2/unlabeled.txt (1_N/ for 1/N when present; busi: "
        "<root>/splits); a missing folder or list is an error",
    )
    mask_dir: str | None = _f(None, "data", "masks of --data folder (none: <root>/masks)")
    partition: str = _f("1/4", "data", "labelled share of the training set: 1/1, 1/2, 1/4, 1/8, ... (1/2^k)")
    labeled_share: float | None = _f(
        None,
        "data",
        "a labelled share that is no 1/2^k, e.g. SemiSeg-CAW's 468 of 568 (0.824): that share of the whole training "
        "set labelled (with split lists: of both 1_2 lists; with --val-from-train, of what is left after those "
        "images, then drawn from the whole training set), drawn with the seed, the rest unlabelled; replaces "
        "--partition",
        within="(0, 1]",
    )
    limit: int | None = _f(
        None,
        "data",
        "keep a seeded subset of this many images (quick runs); with split lists a proportional subset of each "
        "list, so every image keeps its role",
        at_least=1,
    )
    val_from_train: int = _f(
        0,
        "data",
        "with split lists: validate on this many seeded images carved from the unlabelled training pool "
        "(0: the test list, as the authors select models)",
        at_least=0,
    )
    pseudo_label_check: int = _f(
        0,
        "run",
        "diagnosis: grade the teacher's pseudo-labels on this many fixed unlabelled images after each epoch "
        "with their hidden masks (never used for training; 0: off)",
        at_least=0,
    )
    synthetic_n: int = _f(
        200, "data", "synthetic images", at_least=4, at_most=(100000, "images are generated one by one")
    )
    synthetic_size: int = _f(
        128,
        "data",
        "side of the synthetic images",
        at_least=16,
        at_most=(2048, "the synthetic images are generated at this side"),
    )
    # augmentation
    crop: int = _f(
        128,
        "augment",
        "side of the random training crop (upstream 512; padding is ignored, 255)",
        at_least=16,
        at_most=(4096, "upstream crops 512"),
    )
    fov: int = _f(
        0,
        "augment",
        "field of view: resize each image (aspect kept) so that its longer side is this many pixels before the random "
        "scale and crop, and alike at evaluation, the prediction resized back to the image's own size for the metrics "
        "(upstream's 512-px crops see most of a ~500-px image; 0: the original size)",
        at_least=0,
        at_most=(4096, "the longer side of the resized images"),
    )
    scale_min: float = _f(0.5, "augment", "smallest random scale of the original image (aspect kept)", positive=True)
    scale_max: float = _f(
        2.0, "augment", "largest random scale", at_most=(4.0, "the random scale of the original image; upstream 2.0")
    )
    flip: bool = _f(True, "augment", "random horizontal flip")
    # model
    model: str = _f(
        "unet",
        "model",
        "network: unet, deeplab, or SemiSeg-CAW's backbones malunet (MALUNet, 0.18 M) and unext (UNeXt, 1.47 M) "
        "(semiseg_caw builds its pair around it; lanet builds its own on --backbone)",
        ("unet", "deeplab", "malunet", "unext"),
    )
    backbone: str = _f(
        "resnet18",
        "model",
        "ResNet of deeplab and lanet (lanet also: unet)",
        ("resnet18", "resnet34", "resnet50", "resnet101", "unet"),
    )
    in_channels: int = _f(
        1, "model", "network input channels: 1 gray, or 3 (gray replicated, ImageNet mean/std, as upstream)", (1, 3)
    )
    pretrained: str | None = _f(
        None, "model", "local ImageNet ResNet state dict (torchvision, timm or U2PL names); nothing is downloaded"
    )
    stem: str = _f(
        "deep",
        "model",
        "ResNet stem: deep (U2PL/RA-BUSSeg/PH-Net), plain (torchvision, timm resnetNN), timm-d (timm resnetNNd)",
        ("deep", "plain", "timm-d"),
    )
    multi_grid: bool = _f(True, "model", "ResNet layer4 multi-grid dilations 4-8-16 (upstream multi_grid)")
    zero_init_residual: bool = _f(True, "model", "ResNet: the last BN of each residual branch starts at 0 (upstream)")
    unet_base: int = _f(
        16,
        "model",
        "U-Net width (SSL4MIS U-Net: 16)",
        at_least=1,
        at_most=(128, "the deepest U-Net map has 16x this many channels; SSL4MIS uses 16"),
    )
    unet_rep_stride: int = _f(
        4,
        "model",
        "unet: pixels per feature of the decoder map PH-Net's projector reads: 4 as upstream's DeepLab decoder "
        "(1: the full-resolution last map, 16x the projector's work; the default before 2026-12-07)",
        (1, 2, 4, 8),
    )
    dropout: bool = _f(
        True,
        "model",
        "upstream dropout in the unet/deeplab of suponly, rabusseg and phnet: Dropout2d(0.1) on the classifier path "
        "and in the heads, as U2PL/RA-BUSSeg/PH-Net (the EMA teacher's pseudo-labels come without it)",
    )
    encoder_dropout: bool = _f(
        False,
        "model",
        "unet: also the SSL4MIS encoder dropout (Dropout 0.05-0.5 in the encoder blocks; far stronger than upstream's)",
    )
    proj_dim: int = _f(
        64, "model", "RA-BUSSeg relation projection channels (upstream 256)", at_least=1, at_most=(2048, "upstream 256")
    )
    rep_dim: int = _f(
        64, "model", "PH-Net projector channels (paper 256)", at_least=1, at_most=(2048, "the paper's 256")
    )
    # optimisation
    epochs: int = _f(10, "optim", "training epochs (an epoch: one pass over the larger of the two streams)", at_least=1)
    warmup_epochs: int = _f(
        1, "optim", "supervised-only epochs first (upstream sup_only_epoch; papers: 10 of 200)", at_least=0
    )
    max_steps: int | None = _f(None, "optim", "cap on steps per epoch (smoke runs)", at_least=1)
    batch_labeled: int = _f(
        2,
        "optim",
        "labelled images per step (RA-BUSSeg code 2; PH-Net text 4)",
        at_least=1,
        at_most=(1024, "images per step"),
    )
    batch_unlabeled: int = _f(2, "optim", "unlabelled images per step", at_least=1, at_most=(1024, "images per step"))
    optimizer: str = _f("sgd", "optim", "optimizer (LA-Net: adam; SemiSeg-CAW: adamw)", ("sgd", "adam", "adamw"))
    lr: float = _f(0.003, "optim", "initial learning rate", positive=True)
    momentum: float = _f(0.9, "optim", "SGD momentum", within="[0, 1)")
    weight_decay: float = _f(5e-4, "optim", "weight decay (RA-BUSSeg code 5e-4; PH-Net text 1e-4)", non_negative=True)
    lr_schedule: str = _f("poly", "optim", "learning-rate decay per step", ("poly", "cosine", "constant"))
    poly_power: float = _f(0.9, "optim", "poly decay: lr·(1 − step/steps)^power", positive=True)
    ema: float = _f(0.99, "optim", "teacher EMA decay (RA-BUSSeg code 0.99; PH-Net text 0.999)", within="[0, 1)")
    criterion: str = _f(
        "ohem",
        "optim",
        "supervised loss: ce, ohem (U2PL/RA-BUSSeg CriterionOhem) or ce+dice (CE + soft Dice, for short runs); "
        "lanet's sigmoid head always uses binary CE",
        ("ce", "ohem", "ce+dice"),
    )
    ohem_thresh: float = _f(
        0.7, "optim", "OHEM: pixels whose true-class probability is at most this are kept", positive=True
    )
    ohem_min_kept: int = _f(
        100000, "optim", "OHEM: at least this many pixels are kept (0: plain CE, as upstream)", at_least=0
    )
    ohem_scale: bool = _f(
        True,
        "optim",
        "OHEM: ohem_min_kept is upstream's for its batch of 2 crops of 512²; scaled by this batch's pixels, so the "
        "kept share is upstream's (off: as given; 100000 keeps every pixel of a 4 × 128² batch)",
    )
    stage1_epochs: int = _f(
        1,
        "optim",
        "first-stage epochs of lanet (localisation) and semiseg_caw (ClassElevateSeg pre-training)",
        at_least=0,
    )
    # the settings groups (methods.GROUPS): cfg.pseudo, then each method's own, cfg.<method>
    pseudo: methods.PseudoLabelSettings = _group(methods.PseudoLabelSettings)
    rabusseg: methods.rabusseg.RABUSSegSettings = _group(methods.rabusseg.RABUSSegSettings)
    phnet: methods.phnet.PHNetSettings = _group(methods.phnet.PHNetSettings)
    lanet: methods.lanet.LANetSettings = _group(methods.lanet.LANetSettings)
    semiseg_caw: methods.semiseg_caw.SemiSegCAWSettings = _group(methods.semiseg_caw.SemiSegCAWSettings)

    def __init__(self, **values):
        """Settings by their flag names (`lambda_arp=2.0`, wherever it is kept) or as whole groups
        (`rabusseg=RABUSSegSettings(...)` or a mapping of its settings)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for key, value in values.items():
            if key in GROUP_KEYS and not isinstance(value, dict):
                setattr(self, key, dataclasses.replace(value))  # a copy: no two configs share a group
            elif key in GROUP_KEYS:
                for name, v in value.items():
                    if name not in GROUP_FIELDS[key]:
                        raise TypeError(f"TrainConfig: the {key} group has no setting {name!r}")
                    setattr(getattr(self, key), name, v)
            elif key in PLACE:
                setattr(getattr(self, PLACE[key]) if PLACE[key] else self, key, value)
            else:
                raise TypeError(f"TrainConfig: unexpected setting {key!r}")

    def __setattr__(self, name, value):
        if name not in FIELDS:  # `cfg.gamma = 0.5` would otherwise set a value nothing reads
            raise AttributeError(self._where(name))
        super().__setattr__(name, value)

    def __getattr__(self, name):  # only for names that are not fields
        raise AttributeError(self._where(name))

    @staticmethod
    def _where(name: str) -> str:
        if PLACE.get(name):
            return f"TrainConfig: {name} is in the {PLACE[name]} group: cfg.{PLACE[name]}.{name}"
        return f"TrainConfig has no setting {name!r}"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """A config from plain values (a config file, a checkpoint), flat or with its groups nested;
        unknown keys and values of the wrong type are errors that name the key. Values are checked
        (:meth:`validate`)."""
        values = flatten(d, source)
        unknown = sorted(set(values) - set(PLACE))
        if unknown:
            renamed = {"size": "crop", "dice_weight": "criterion"}
            hints = [f"{k} (now {renamed[k]})" if k in renamed else k for k in unknown]
            raise UserError(f"{source}: unknown config keys: {', '.join(hints)}")
        cfg = cls(**{k: _coerce(k, v, TYPES[k], source) for k, v in values.items()})
        cfg.validate()
        return cfg

    def flat(self) -> dict:
        """Every setting by its flag name (the layout of a flat config file)."""
        return flatten(dataclasses.asdict(self))

    def validate(self) -> None:
        """Range and combination checks, all before the first step (a value that could only fail
        mid-training, such as an infinite learning rate or a network too large to allocate, is
        refused here); the error names the flag. Then the method's own (methods/)."""
        check(self)
        self.partition = normalise_partition(self.partition)
        for key in GROUP_KEYS:
            group = getattr(self, key)
            check(group)
            if hasattr(group, "validate"):
                group.validate()
        if self.ohem_thresh > 1:
            raise UserError(f"--ohem-thresh {self.ohem_thresh}: must be in (0, 1]")
        if not self.scale_min <= 1 <= self.scale_max:
            raise UserError(
                f"--scale-min {self.scale_min} / --scale-max {self.scale_max}: need scale-min ≤ 1 ≤ scale-max "
                "(upstream draws below or above 1 with equal chance)"
            )
        if self.data != "synthetic" and not self.root:
            raise UserError(f"--root is required for --data {self.data}")
        if self.data == "synthetic" and (self.split_dir or self.split_mode == "lists"):
            raise UserError(
                f"{'--split-dir' if self.split_dir else '--split-mode lists'}: synthetic data has no split lists "
                "(it is split 8:1:1 with --seed)"
            )
        if self.split_mode == "random" and self.split_dir:
            raise UserError("--split-mode random and --split-dir: choose the split lists or the random split, not both")
        if self.split_mode == "lists" and self.data in ("udiat", "folder") and not self.split_dir:
            raise UserError(f"--split-mode lists: give the folder of the lists (--split-dir) for --data {self.data}")
        if self.model in ("malunet", "unext"):
            small = [(n, getattr(self, n)) for n in ("crop", "synthetic_size") if getattr(self, n) < 32]
            if small and (small[0][0] == "crop" or self.data == "synthetic"):
                name, v = small[0]
                raise UserError(f"{flag(name)} {v}: --model {self.model} pools five times (stride 32); use 32 or more")
        methods.get(self.method).check(self)
        if self.device != "cpu" and not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise UserError(f"--device {self.device!r}: expected cpu, cuda or cuda:N")
        if self.amp == "fp16" and self.device == "cpu":
            raise UserError(
                "--amp fp16: float16 needs --device cuda (the CPU has no fast float16 kernels, PyTorch emulates "
                "them); use --amp bf16 on the CPU"
            )


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
GROUP_KEYS = tuple(methods.GROUPS)
GROUP_FIELDS = {key: {f.name for f in dataclasses.fields(group)} for key, group in methods.GROUPS.items()}
# Where each setting is kept, by its flag name: None (the config itself) or its group's key.
PLACE = {f.name: None for f in dataclasses.fields(TrainConfig) if f.name not in GROUP_KEYS}
for _key, _names in GROUP_FIELDS.items():
    for _name in _names:
        assert _name not in PLACE, f"two settings are called {_name}: each flag must name one"
        PLACE[_name] = _key
TYPES = {
    **{k: v for k, v in typing.get_type_hints(TrainConfig).items() if k not in GROUP_KEYS},
    **{k: v for group in methods.GROUPS.values() for k, v in typing.get_type_hints(group).items() if k != "title"},
}


def flatten(d: dict, source: str = "config") -> dict:
    """Plain config values, flat or with groups nested (`rabusseg: {lambda_arp: 2}`), by flag name."""
    flat = {}
    for key, value in d.items():
        if key in GROUP_KEYS and isinstance(value, dict):
            unknown = sorted(set(value) - GROUP_FIELDS[key])
            if unknown:
                raise UserError(f"{source}: unknown config keys in {key}: {', '.join(unknown)}")
            flat.update(value)
        else:
            flat[key] = value
    return flat


def nested(flat: dict) -> dict:
    """Flat config values (by flag name) with the grouped ones in their groups: a config's layout."""
    out = {}
    for key, value in flat.items():
        place = PLACE.get(key)
        if place is None:
            out[key] = value
        else:
            out.setdefault(place, {})[key] = value
    return out


def _coerce(name, value, hint, source):
    """A config-file value as the field's type (an int where a float is expected is fine)."""
    if value is None and type(None) in typing.get_args(hint):
        return None
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if typing.get_args(hint) else hint
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is str and name == "partition" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise UserError(f"{source}: {name}: expected {base.__name__}, got {value!r}")


def normalise_partition(text) -> str:
    """ "1/N" with N a power of two (the papers' 1/2, 1/4, 1/8 protocols, 1/1 = all labelled); a
    decimal such as 0.25 is accepted for the same shares."""
    value = None
    try:
        if isinstance(text, str) and "/" in text:
            a, b = text.split("/")
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        pass
    n = round(1 / value) if value and value > 0 else 0
    if not value or n < 1 or abs(value * n - 1) > 1e-9 or n & (n - 1):
        raise UserError(f"--partition {text}: expected 1/N with N a power of two (1/1, 1/2, 1/4, 1/8, ...)")
    return f"1/{n}"


def partition_fraction(text: str) -> float:
    return 1.0 / int(normalise_partition(text).split("/")[1])


# ----------------------------------------------------------------------------------------------
# Files and presets


def presets() -> list[str]:
    """Names of the shipped presets (train/configs/NAME.yaml)."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def preset_path(name: str) -> str:
    path = os.path.join(PRESET_DIR, name + ".yaml")
    if not os.path.isfile(path):
        raise UserError(f"--preset {name}: no such preset (available: {', '.join(presets())})")
    return path


def load_file(path: str, what: str = "--config") -> dict:
    """TrainConfig values by flag name from a YAML or JSON file in our layout (flat, or with the
    methods' groups nested: `rabusseg: {lambda_arp: 2}`) or upstream's nested one
    (`dataset`, `trainer`, `net`, `criterion`, `saver`). A key given twice is an error (YAML and JSON
    would keep the last silently). Relative paths in the file (root, split lists, masks, weights,
    output) are read from the file's folder, wherever the command runs. Types are checked by
    TrainConfig.from_dict."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    with open(path) as f:
        text = f.read()
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        doc = _parse_json(text) if kind == "JSON" else _parse_yaml(text)
    except _DuplicateKey as err:
        raise UserError(f"{path}: {err}") from None
    except ImportError:
        raise UserError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a JSON config") from None
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: say where
        raise UserError(f"{path}: not valid {kind}: {_one_line(err)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    # Upstream sections are mappings (a flat `criterion: ohem` is our key of the same name).
    nested = {k: doc.pop(k) for k in UPSTREAM_SECTIONS if isinstance(doc.get(k), dict)}
    values = from_upstream(nested, path) if nested else {}
    values.update(flatten(doc, path))  # our keys (flat, or in their groups) override the upstream sections
    unknown = sorted(set(values) - set(PLACE))
    if unknown:
        raise UserError(f"{path}: unknown config keys: {', '.join(unknown)}")
    values = {k: _coerce(k, v, TYPES[k], path) for k, v in values.items()}
    folder = os.path.dirname(os.path.abspath(path))
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and values[key] and not os.path.isabs(os.path.expanduser(values[key])):
            values[key] = os.path.normpath(os.path.join(folder, values[key]))
    return values


# Config values that are paths: relative ones in a config file are relative to the file.
PATH_KEYS = ("root", "split_dir", "mask_dir", "pretrained", "out")


class _DuplicateKey(ValueError):
    pass


def _parse_json(text: str):
    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                raise _DuplicateKey(f"key {k!r} is given twice")
            seen[k] = v
        return seen

    return json.loads(text, object_pairs_hook=pairs)


def _parse_yaml(text: str):
    """yaml.safe_load, except that a key given twice in one mapping is an error naming it and its lines."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):  # the base constructor names that error
                break
            if key in first:
                raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first on line {first[key]})")
            first[key] = line
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# ----------------------------------------------------------------------------------------------
# The upstream nested layout (RA-BUSSeg experiments/*/config.yaml, U2PL's experiments)

UPSTREAM_SECTIONS = ("dataset", "trainer", "net", "criterion", "saver")
_IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
_IMAGENET_STD_255 = [58.395, 57.12, 57.375]


def _fixed(expected, why: str):
    """A key that is accepted only with the value this code always uses."""

    def handle(v, path):
        if v != expected:
            raise UserError(f"{path}: {v!r} is not supported here ({why}; only {expected!r})")
        return {}

    return handle


def _to(name: str, convert=None):
    def handle(v, path):
        return {name: convert(v) if convert else v}

    return handle


def _ignored(why: str):
    def handle(v, path):  # accepted as the upstream files have it; `why` says why it changes nothing
        return {}

    return handle


def _dataset_type(v, path):
    kinds = {"bus_semi": "rabusseg", "bus": "suponly"}
    if v not in kinds:
        raise UserError(f"{path}: {v!r} is not supported here (bus_semi or bus)")
    return {"method": kinds[v]}


def _train_list(v, path):
    """data/BUSI/1_2/labeled.txt → the BUSI layout, split lists in data/BUSI, partition 1/2 (upstream
    picks the dataset the same way: by BUSI or UDIAT in the list's path)."""
    folder, name = os.path.split(str(v))
    parts, part = os.path.split(folder)
    data = "busi" if "BUSI" in str(v) else "udiat" if "UDIAT" in str(v) else None
    if name != "labeled.txt" or "_" not in part or data is None:
        raise UserError(f"{path}: {v!r}: expected <lists>/<BUSI|UDIAT...>/1_N/labeled.txt as upstream")
    return {"data": data, "split_dir": parts, "partition": part.replace("_", "/")}


def _crop_size(v, path):
    if not (isinstance(v, list) and len(v) == 2 and v[0] == v[1] and isinstance(v[0], int)):
        raise UserError(f"{path}: {v!r}: only square crops [S, S] are supported here")
    return {"crop": v[0]}


def _scale(v, path):
    if not (isinstance(v, list) and len(v) == 2):
        raise UserError(f"{path}: {v!r}: expected [min, max]")
    return {"scale_min": v[0], "scale_max": v[1]}


def _batch(v, path):
    return {"batch_labeled": v, "batch_unlabeled": v}  # upstream: one batch size for both loaders


def _normalisation(expected):
    def handle(v, path):
        if not (isinstance(v, list) and len(v) == 3 and all(math.isclose(a, b) for a, b in zip(v, expected))):
            raise UserError(f"{path}: {v!r}: only the ImageNet values {expected} are supported here")
        return {"in_channels": 3}  # RGB input normalised with ImageNet statistics

    return handle


def _optimizer(v, path):
    kinds = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
    if v not in kinds:
        raise UserError(f"{path}: {v!r} is not supported here (SGD, Adam, AdamW)")
    return {"optimizer": kinds[v]}


def _schedule(v, path):
    if v not in ("poly", "cosine"):
        raise UserError(f"{path}: {v!r} is not supported here (poly, cosine)")
    return {"lr_schedule": v}


def _apply_aug(v, path):
    """U2PL: with probability 0.5 the unlabelled batch gets the named strong augmentation."""
    if v is False:
        return {"cutmix_p": 0.0}
    if v == "cutmix":
        return {"cutmix_p": 0.5}
    raise UserError(f"{path}: {v!r} is not supported here (False or cutmix)")


def _criterion(v, path):
    kinds = {"ohem": "ohem", "CELoss": "ce", "ce": "ce"}
    if v not in kinds:
        raise UserError(f"{path}: {v!r} is not supported here (ohem or CELoss)")
    return {"criterion": kinds[v]}


def _encoder(v, path):
    name = str(v).rsplit(".", 1)[-1]
    if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise UserError(f"{path}: {v!r} is not supported here (a resnet18/34/50/101 encoder)")
    return {"backbone": name}


def _decoder(v, path):
    if not str(v).endswith("dec_deeplabv3_plus"):
        raise UserError(f"{path}: {v!r} is not supported here (dec_deeplabv3_plus)")
    return {"model": "deeplab"}


def _pretrain(v, path):
    if v:
        raise UserError(
            f"{path}: {v!r}: upstream checkpoints are pickles and are not loaded; start from --pretrained "
            "(an ImageNet backbone) or --resume a busseg checkpoint"
        )
    return {}


UPSTREAM_KEYS = {
    "dataset.type": _dataset_type,
    "dataset.train.data_root": _to("root"),
    "dataset.train.data_list": _train_list,
    "dataset.train.flip": _to("flip"),
    "dataset.train.GaussianBlur": _fixed(False, "no Gaussian blur augmentation"),
    "dataset.train.rand_resize": _scale,
    "dataset.train.crop.type": _fixed("rand", "random crops"),
    "dataset.train.crop.size": _crop_size,
    "dataset.train.batch_size": _batch,
    "dataset.batch_size": _batch,  # U2PL's configs keep it here
    "dataset.val.data_root": _ignored("must be the training data_root (checked)"),
    "dataset.val.data_list": _ignored("must be test.txt beside the training lists (checked)"),
    "dataset.val.batch_size": _ignored("evaluation runs image by image"),
    "dataset.n_total": _ignored("counted from the split lists"),
    "dataset.n_sup": _ignored("counted from the split lists"),
    "dataset.noise_std": _ignored("not read by the upstream training code either"),
    "dataset.workers": _to("num_workers"),
    "dataset.mean": _normalisation(_IMAGENET_MEAN_255),
    "dataset.std": _normalisation(_IMAGENET_STD_255),
    "dataset.ignore_label": _fixed(255, "ignored pixels are 255"),
    "trainer.epochs": _to("epochs"),
    "trainer.eval_on": _fixed(True, "the teacher is evaluated every epoch"),
    "trainer.sup_only_epoch": _to("warmup_epochs"),
    "trainer.optimizer.type": _optimizer,
    "trainer.optimizer.kwargs.lr": _to("lr"),
    "trainer.optimizer.kwargs.momentum": _to("momentum"),
    "trainer.optimizer.kwargs.weight_decay": _to("weight_decay"),
    "trainer.lr_scheduler.mode": _schedule,
    "trainer.lr_scheduler.kwargs.power": _to("poly_power"),
    "trainer.unsupervised.TTA": _fixed(False, "no test-time augmentation"),
    "trainer.unsupervised.drop_percent": _to("drop_percent"),
    "trainer.unsupervised.apply_aug": _apply_aug,
    "trainer.unsupervised.loss_weight": _to("lambda_u"),
    "saver.snapshot_dir": _to("out"),
    "saver.log_dir": _ignored("metrics.csv and tb/ go to the output folder"),
    "saver.pretrain": _pretrain,
    "saver.auto_resume": _fixed(False, "resume with --resume"),
    "criterion.type": _criterion,
    "criterion.kwargs.use_weight": _fixed(False, "no class weights"),
    "criterion.kwargs.thresh": _to("ohem_thresh"),
    "criterion.kwargs.min_kept": _to("ohem_min_kept"),
    "net.num_classes": _fixed(2, "lesion and background"),
    "net.sync_bn": _ignored("SyncBatchNorm is used under multi-GPU DDP"),
    "net.ema_decay": _to("ema"),
    "net.encoder.type": _encoder,
    "net.encoder.kwargs.multi_grid": _to("multi_grid"),
    "net.encoder.kwargs.zero_init_residual": _to("zero_init_residual"),
    "net.encoder.kwargs.fpn": _fixed(True, "the four stage maps are always returned"),
    "net.encoder.kwargs.replace_stride_with_dilation": _fixed([False, True, True], "output stride 8"),
    "net.decoder.type": _decoder,
    "net.decoder.kwargs.inner_planes": _fixed(256, "the DeepLabv3+ decoder has 256 channels"),
    "net.decoder.kwargs.dilations": _fixed([12, 24, 36], "ASPP rates 12/24/36"),
}


def _leaves(doc: dict, prefix: str = ""):
    for k, v in doc.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path not in UPSTREAM_KEYS:
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def from_upstream(doc: dict, source: str) -> dict:
    """Flat values from the nested upstream layout; every key that has no meaning here is an error
    that names it. See UPSTREAM_KEYS for the mapping (README: "Upstream configs")."""
    values, seen = {}, {}
    for path, v in _leaves(doc):
        handler = UPSTREAM_KEYS.get(path)
        if handler is None:
            raise UserError(f"{source}: {path} has no counterpart here")
        values.update(handler(v, f"{source}: {path}"))
        seen[path] = v
    val_root, train_root = seen.get("dataset.val.data_root"), seen.get("dataset.train.data_root")
    if val_root is not None and val_root != train_root:
        raise UserError(f"{source}: dataset.val.data_root: must equal dataset.train.data_root")
    val_list = seen.get("dataset.val.data_list")
    if val_list is not None:
        expected = os.path.join(values.get("split_dir", ""), "test.txt")
        if os.path.normpath(str(val_list)) != os.path.normpath(expected):
            raise UserError(
                f"{source}: dataset.val.data_list: expected {expected} (the test list beside the training lists)"
            )
    return values
