"""The `busseg` command explains itself and refuses bad input with one line; checkpoints are safe,
checksummed, resumable from the stored config and exportable as plain state dicts."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image
from train_helpers import tiny

from busseg_ops.train import Trainer, checkpoint, cli, config, engine
from busseg_ops.train.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_help_names_every_method_and_every_default(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, sentence in config.METHODS.items():
        assert f"{name} {' '.join(sentence.split())}" in text, name
    for name in ("--drop-percent", "--criterion {ce,ohem,ce+dice}", "--pretrained", "--preset NAME", "--resume"):
        assert name in text
    import dataclasses

    assert text.count("(default: ") >= len(dataclasses.fields(config.TrainConfig))
    for title in config.GROUPS.values():
        assert f"{title}:" in text


class _StopAfter:
    def __init__(self, n):
        self.n = n

    @property
    def requested(self):
        self.n -= 1
        return self.n < 0


class _Evil:
    """Unpickling this would create a file: the side effect that must not happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A rabusseg run stopped in the middle of its second epoch (last.pt), and its best.pt."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny(tmp, method="rabusseg", warmup_epochs=1, epochs=2, max_steps=2)
    tr = Trainer(cfg)
    tr._run_epoch(_StopAfter(99))
    assert tr._run_epoch(_StopAfter(0)) is True  # stopped after 1 of 2 steps
    return cfg


@pytest.fixture
def bad_inputs(tmp_path, run):
    """Files for the bad-input list: a crafted pickle, a byte-flipped checkpoint, a BUSI folder with
    a broken image, a torchvision state dict for the deep stem, a file where the output folder goes."""
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"config": {}, "teacher": _Evil(str(marker))}, f)
    flipped = tmp_path / "flipped.pt"
    blob = bytearray(open(os.path.join(run.out, "last.pt"), "rb").read())
    with zipfile.ZipFile(os.path.join(run.out, "last.pt")) as z:  # a byte inside the largest tensor
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    head = info.header_offset
    start = (
        head
        + 30
        + int.from_bytes(blob[head + 26 : head + 28], "little")
        + int.from_bytes(blob[head + 28 : head + 30], "little")
    )
    blob[start + info.file_size // 2] ^= 0x10
    flipped.write_bytes(bytes(blob))
    busi = tmp_path / "BUSI"
    for c in ("benign", "malignant"):
        (busi / c).mkdir(parents=True)
        for i in range(1, 6):
            Image.new("L", (40, 30), 90).save(busi / c / f"{c} ({i}).png")
            Image.new("L", (40, 30), 255).save(busi / c / f"{c} ({i})_mask.png")
    (busi / "malignant" / "malignant (4).png").write_bytes(b"not an image")
    torchvision = tmp_path / "r18_torchvision.pth"
    src = engine.models.resnet18(stem="plain").state_dict()
    torch.save(src, torchvision)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    text = tmp_path / "notes.pt"  # not a zip, not a pickle: damaged, not dangerous
    text.write_text("hello\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("epochs: 3\nlr: 0.01\nepochs: 5\n")
    # Hand-edited checkpoints whose digest was recomputed: they pass the checksum.
    edited = {}
    for name, edit in (
        ("no_teacher", lambda st: st.pop("teacher")),
        ("negative_epoch", lambda st: st.update(epoch=-5)),
        (
            "nan_teacher",
            lambda st: next(v for v in st["teacher"].values() if v.is_floating_point()).fill_(float("nan")),
        ),
        ("other_method", lambda st: st["config"].update(method="phnet", model="deeplab")),
    ):
        st = checkpoint.load(os.path.join(run.out, "last.pt"))
        edit(st)
        edited[name] = tmp_path / f"{name}.pt"
        checkpoint.save(st, str(edited[name]))
    return dict(
        evil=evil,
        marker=marker,
        flipped=flipped,
        busi=busi,
        torchvision=torchvision,
        blocker=blocker,
        text=text,
        twice=twice,
        **edited,
    )


def _cases(b, run):
    small = ["--synthetic-n", "24", "--synthetic-size", "64", "--quiet"]
    return {
        # bad paths and files
        "missing root": (["train", "--data", "busi", "--root", str(b["busi"]) + "_nowhere"], "--root"),
        "bad image, suponly": (
            ["train", "--data", "busi", "--root", str(b["busi"]), "--split-mode", "random", "--quiet"]
            + ["--out", str(b["busi"].parent / "o")],
            "malignant (4).png",
        ),
        "busi without lists": (["train", "--data", "busi", "--root", str(b["busi"])], "no split lists at"),
        "missing split dir": (
            ["train", "--data", "busi", "--root", str(b["busi"]), "--split-dir", str(b["busi"] / "nowhere")],
            "nowhere: no such folder",
        ),
        "text file as checkpoint": (["eval", "--checkpoint", str(b["text"])], "notes.pt: not a PyTorch checkpoint"),
        "edited: no teacher": (["eval", "--checkpoint", str(b["no_teacher"])], "no 'teacher' entry"),
        "edited: no teacher, predict": (
            ["predict", str(b["busi"] / "benign"), "--checkpoint", str(b["no_teacher"])],
            "no 'teacher' entry",
        ),
        "edited: negative epoch": (["train", "--resume", str(b["negative_epoch"])], "epoch -5 is negative"),
        "edited: NaN teacher": (["eval", "--checkpoint", str(b["nan_teacher"])], "NaN or infinite values"),
        "edited: other network": (["eval", "--checkpoint", str(b["other_method"])], "do not fit the network"),
        "key twice": (["train", "--config", str(b["twice"])], "line 3: key 'epochs' is given twice (first on line 1)"),
        "crafted checkpoint": (["train", "--resume", str(b["evil"])], "evil.pt: refused"),
        "flipped checkpoint": (["train", "--resume", str(b["flipped"])], "flipped.pt: checksum mismatch"),
        "eval crafted checkpoint": (["eval", "--checkpoint", str(b["evil"])], "evil.pt: refused"),
        "missing pretrained": (["train", "--model", "deeplab", "--pretrained", "nowhere.pth", *small], "--pretrained"),
        "pretrained shapes": (
            ["train", "--model", "deeplab", "--pretrained", str(b["torchvision"]), *small],
            "r18_torchvision.pth: shape mismatch",
        ),
        "unwritable out": (["train", "--out", str(b["blocker"] / "run"), *small], "--out"),
        "missing config": (["train", "--config", "nowhere.yaml"], "--config nowhere.yaml"),
        # bad values, the ones that failed mid-training (or hung) among them
        "partition 1/3": (["train", "--partition", "1/3"], "--partition 1/3"),
        "huge synthetic set": (["train", "--synthetic-n", str(10**12)], "--synthetic-n 1000000000000: must be at most"),
        "lr inf": (["train", "--lr", "inf"], "--lr inf: must be a finite number"),
        "weight decay inf": (["train", "--weight-decay", "inf"], "--weight-decay inf: must be a finite number"),
        "lambda-u nan": (["train", "--lambda-u", "nan"], "--lambda-u nan: must be a finite number"),
        "arp kernel over the op's limit": (["train", "--arp-kernel", "32769"], "--arp-kernel 32769: must be at most"),
        "arp kernel over the grid": (
            ["train", "--method", "rabusseg", "--crop", "64", "--num-proxies", "8", "--arp-kernel", "33", *small],
            "--arp-kernel 33: the 4×4 relation grid",
        ),
        "huge unet": (["train", "--unet-base", "100000"], "--unet-base 100000: must be at most 128"),
        "huge projection": (["train", "--proj-dim", "1000000"], "--proj-dim 1000000: must be at most"),
        "huge bank": (["train", "--bank-size", "1000000000"], "--bank-size 1000000000: must be at most"),
        "huge scale": (["train", "--scale-max", "1e6"], "--scale-max 1000000.0: must be at most"),
        "abbreviated flag": (["train", "--epoch", "3"], "unrecognized arguments: --epoch 3"),
        "negative window": (["predict", "x.png", "--checkpoint", "c.pt", "--window", "-5"], "--window: -5"),
        "negative eval window": (["eval", "--checkpoint", "c.pt", "--window", "-1"], "--window: -1"),
        "epochs 0": (["train", "--epochs", "0"], "--epochs 0"),
        "epochs abc": (["train", "--epochs", "abc"], "--epochs"),
        "drop percent": (["train", "--drop-percent", "0"], "--drop-percent"),
        "method": (["train", "--method", "unet"], "--method"),
        "fp16 on the cpu": (["train", "--amp", "fp16", *small], "--amp fp16"),
        "no cuda": (["train", "--device", "cuda", *small], "--device cuda") if not torch.cuda.is_available() else None,
        # incompatible flags: the default 64 proxies on the 4×4 relation grid of a 64-px crop
        "num proxies": (["train", "--method", "rabusseg", "--crop", "64", *small], "--num-proxies 64"),
        "patches": (["train", "--method", "phnet", "--num-patches", "3", *small], "--num-patches 3"),
    }


DRIVER = """
import contextlib, io, json, sys
from busseg_ops.train import cli
out = {}
for name, argv in json.load(sys.stdin).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_bad_inputs_give_one_line_and_exit_2_subprocess(bad_inputs, run):
    cases = {k: v for k, v in _cases(bad_inputs, run).items() if v is not None}
    r = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps({k: argv for k, (argv, _) in cases.items()}),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(bad_inputs["busi"].parent),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (_, needle) in cases.items():
        code, err = got[name]
        assert code == 2, (name, code, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert needle in err, (name, needle, err)
    assert not bad_inputs["marker"].exists(), "unpickling the crafted checkpoint ran its code"
    # The console script itself: one line, status 2, and the crafted file still inert.
    busseg = os.path.join(os.path.dirname(sys.executable), "busseg")
    r = subprocess.run([busseg, "train", "--resume", str(bad_inputs["evil"])], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "evil.pt: refused" in r.stderr, r.stderr
    assert not bad_inputs["marker"].exists()


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["train", "--partition", "1/3"]) == 2
    assert (
        capsys.readouterr().err
        == "busseg: error: --partition 1/3: expected 1/N with N a power of two (1/1, 1/2, 1/4, 1/8, ...)\n"
    )
    for argv in (["--debug", "train", "--partition", "1/3"], ["train", "--partition", "1/3", "--debug"]):
        with pytest.raises(UserError, match="--partition 1/3"):
            cli.main(argv)


def test_checkpoints_are_plain_data_and_checksummed(run, bad_inputs):
    path = os.path.join(run.out, "last.pt")
    plain = torch.load(path, weights_only=True)  # torch's own safe loader reads it
    assert plain["format"] == checkpoint.FORMAT and len(plain["sha256"]) == 64
    st = checkpoint.load(path)
    assert st["config"]["method"] == "rabusseg" and set(st["teacher"]) == set(st["student"])
    assert torch.is_tensor(st["rng"]["torch"]) and isinstance(st["rng"]["python"], list)
    with pytest.raises(UserError, match=r"evil\.pt: refused"):
        checkpoint.load(str(bad_inputs["evil"]))
    assert not bad_inputs["marker"].exists()
    with pytest.raises(UserError, match=r"flipped\.pt: checksum mismatch"):
        checkpoint.load(str(bad_inputs["flipped"]))


def test_bare_resume_continues_the_stored_run_and_export_loads_in_plain_torch(run, tmp_path, capsys):
    assert cli.main(["train", "--resume", os.path.join(run.out, "last.pt")]) == 0  # nothing else given
    out = capsys.readouterr().out
    expected = f"resuming {run.out}/last.pt: rabusseg on synthetic, 1 of 2 epochs done and 1 step(s), output {run.out}"
    assert expected in out
    st = checkpoint.load(os.path.join(run.out, "last.pt"))
    assert (st["epoch"], st["step_in_epoch"], st["global_step"]) == (2, 0, 4)
    assert st["config"] == checkpoint.load(os.path.join(run.out, "best.pt"))["config"]
    # Flags given with --resume override the stored config and are printed.
    assert cli.main(["train", "--resume", os.path.join(run.out, "last.pt"), "--epochs", "3", "--max-steps", "1"]) == 0
    assert "overriding --epochs 2 → 3, --max-steps 2 → 1" in capsys.readouterr().out
    assert checkpoint.load(os.path.join(run.out, "last.pt"))["epoch"] == 3
    # Export: the teacher as a plain state dict plus the config to build the network.
    model_pt = tmp_path / "model.pt"
    assert cli.main(["export", os.path.join(run.out, "best.pt"), str(model_pt), "--format", "state-dict"]) == 0
    weights = torch.load(model_pt, weights_only=True)
    cfg = config.TrainConfig.from_dict(json.load(open(tmp_path / "model.json")))
    model = engine.build_model(cfg)
    model.load_state_dict(weights)  # strict
    teacher = engine.build_model(cfg)
    teacher.load_state_dict(checkpoint.load(os.path.join(run.out, "best.pt"))["teacher"])
    x = torch.rand(1, 1, 48, 40)  # plain grayscale in [0, 1]
    torch.testing.assert_close(model.eval()(x)["pred"], teacher.eval()(x)["pred"], rtol=0, atol=0)
    with pytest.raises(UserError, match="not a busseg training checkpoint"):
        checkpoint.load(str(model_pt))  # an export is not a training checkpoint


def _subparsers(p):
    import argparse

    yield "busseg", p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"busseg {name}", sub


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default():
    missing = []
    for prog, sub in _subparsers(cli.parser()):
        assert sub.allow_abbrev is False, prog  # `--epoch` must not be taken for `--epochs`
        for action in sub._actions:
            if action.help == "==SUPPRESS==" or action.dest in ("help", "command"):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            if not action.help:
                missing.append(f"{prog} {name}: no help")
            elif not action.option_strings or name == "--version":  # positionals: always given
                continue
            elif action.required and "required" not in action.help:
                missing.append(f"{prog} {name}: required, but its help does not say so")
            elif not action.required and "(default: " not in action.help and "default: " not in action.help:
                missing.append(f"{prog} {name}: no default in its help")
    assert not missing, "\n".join(missing)


def test_version_and_no_abbreviations(capsys):
    import busseg_ops

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"busseg {busseg_ops.__version__} (torch {torch.__version__})\n"
    for argv in (["train", "--epoch", "3"], ["predict", "x", "--checkpoint", "c", "--win", "3"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["eval", "--check", "x.pt"])  # not --checkpoint, which is then missing
    assert done.value.code == 2 and "required: --checkpoint" in capsys.readouterr().err


HELP_IMPORTS = """
import subprocess, sys
sys.argv = ["busseg", "--help"]
from busseg_ops.train import cli
try:
    cli.main()
except SystemExit as e:
    assert e.code == 0
print(" ".join(sorted(sys.modules)))
"""


def _modules_after(code: str) -> set:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(r.stdout.strip().splitlines()[-1].split())


def test_busseg_help_imports_no_training_code():
    """`busseg --help` loads the command line alone: not the training, data, image or plotting code
    (the subcommands import what they use)."""
    loaded = _modules_after(HELP_IMPORTS)
    heavy = {"busseg_ops.train.engine", "busseg_ops.train.data", "busseg_ops.models", "PIL", "scipy", "matplotlib"}
    assert "busseg_ops.train.cli" in loaded and not heavy & loaded, sorted(heavy & loaded)
    # The console script itself answers too.
    busseg = os.path.join(os.path.dirname(sys.executable), "busseg")
    r = subprocess.run([busseg, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "train" in r.stdout and "export" in r.stdout


def test_busseg_help_does_not_import_inductor():
    """The Triton variants register on first dispatch (backends.load_triton): their triton_op
    decorators import torch._inductor, about as long again as `import torch`."""
    assert "torch._inductor" not in _modules_after(HELP_IMPORTS)
