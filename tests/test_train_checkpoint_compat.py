"""Checkpoints written before the methods owned their settings and heads (busseg-checkpoint/1, a
flat config, every U-Net with both methods' heads) still evaluate and resume, to the numbers the code
that wrote them gave. The fixture: a tiny rabusseg run after epoch 1 of 2, written by a907c54;
its .json holds what that code printed for it (its teacher on a fixed input and on the test split,
and the resumed epoch 2)."""

import csv
import json
import math
import os
import shutil

import pytest
import torch

from busseg_ops.train import Trainer, checkpoint, cli, config, methods
from busseg_ops.train.errors import UserError
from busseg_ops.train.export import load_network

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
V1 = os.path.join(DATA, "checkpoint_v1_rabusseg.pt")
EXPECTED = json.load(open(os.path.join(DATA, "checkpoint_v1_rabusseg.json")))


def _close(a, b, rel=1e-5):
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-7)


def test_v1_checkpoint_is_upgraded_on_load():
    raw = torch.load(V1, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT_V1 and "lambda_arp" in raw["config"]  # flat, as written
    st = checkpoint.load(V1)
    assert st["config"]["rabusseg"]["num_proxies"] == 4 and "num_proxies" not in st["config"]
    cfg = config.TrainConfig.from_dict(st["config"])
    # the flat layout reads the same (with the settings added since at the values it trained with)
    assert config.TrainConfig.from_dict({**raw["config"], **checkpoint.SETTINGS_ADDED_SINCE_V2}) == cfg
    # rabusseg uses the relation projection, not PH-Net's projector: that one is gone, with its state
    for which in ("student", "teacher"):
        assert not any(k.startswith("heads.rep_head.") for k in st[which])
        assert any(k.startswith("heads.proj_head.") for k in st[which])
    net = methods.get(cfg.method).build_model(cfg)
    assert set(st["teacher"]) == set(net.state_dict())
    n_params = len(list(net.parameters()))
    assert [g["params"] for g in st["optimizer"]["param_groups"]] == [list(range(n_params))]


def test_v1_checkpoint_evaluates_as_it_did(tmp_path):
    model, cfg = load_network(V1)
    x = torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)["pred"].double()
    probe = EXPECTED["probe"]
    assert _close(logits.sum(), probe["sum"]) and _close(logits.abs().sum(), probe["abs_sum"])
    assert all(_close(a, b) for a, b in zip(logits.flatten()[:5].tolist(), probe["first"]))
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", V1, "--out", str(out)]) == 0
    summary = json.load(open(out / "test_metrics.json"))
    for k, v in EXPECTED["teacher_test"].items():
        assert _close(summary[k]["mean"], v), (k, summary[k], v)


def resume_and_compare(path, expected, out):
    """Resume the checkpoint at `path` to its end: the last epoch's log row and the test summary are
    what the code that wrote it printed (`expected`)."""
    st = checkpoint.load(path)
    cfg = config.TrainConfig.from_dict({**config.flatten(st["config"]), "out": str(out)})
    tr = Trainer(cfg, pretrained=False)
    tr.resume(st)
    res = tr.fit()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert set(rows[-1]) == set(expected["epoch2"])
    for k, v in expected["epoch2"].items():
        assert _close(rows[-1][k], v), (k, rows[-1][k], v)
    for k, v in expected["resumed_test"].items():
        assert _close(res[k][0], v), k


def test_v1_checkpoint_resumes_to_the_same_losses(tmp_path):
    resume_and_compare(V1, EXPECTED, tmp_path / "resumed")


def test_unknown_checkpoint_version_is_one_line_naming_it(tmp_path, monkeypatch):
    path = str(tmp_path / "future.pt")
    monkeypatch.setattr(checkpoint, "FORMAT", "busseg-checkpoint/9")
    checkpoint.save({"config": {"method": "suponly"}, "teacher": {}, "student": {}}, path)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"written as busseg-checkpoint/9, which this busseg cannot read") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)


def test_v1_checkpoint_resumes_through_the_cli(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(V1, run / "last.pt")
    assert cli.main(["train", "--resume", str(run / "last.pt"), "--out", str(run), "--overlays", "0"]) == 0
    st = checkpoint.load(str(run / "last.pt"))  # rewritten by this code: the current format
    assert st["epoch"] == 2 and "rabusseg" in st["config"]
    assert torch.load(run / "last.pt", weights_only=True)["format"] == checkpoint.FORMAT


# A phnet checkpoint written by d9f9ec1 (busseg-checkpoint/2), before --unet-rep-stride: its U-Net's projector
# read the full-resolution decoder map, which the new default (4) would not load.
V2_STRIDE1 = os.path.join(DATA, "checkpoint_v2_phnet_stride1.pt")
EXPECTED_STRIDE1 = json.load(open(os.path.join(DATA, "checkpoint_v2_phnet_stride1.json")))


def test_checkpoint_from_before_rep_stride_keeps_its_projector():
    raw = torch.load(V2_STRIDE1, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT and "unet_rep_stride" not in raw["config"]
    st = checkpoint.load(V2_STRIDE1)
    cfg = config.TrainConfig.from_dict(st["config"])
    assert cfg.unet_rep_stride == 1 and config.TrainConfig().unet_rep_stride == 4
    net = methods.get(cfg.method).build_model(cfg)
    net.load_state_dict(st["teacher"])  # strict: the projector takes the last decoder map's channels
    assert net.heads.rep_head.body[0][0].in_channels == cfg.unet_base
    x = torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = load_network(V2_STRIDE1)[0](x)["pred"].double()
    probe = EXPECTED_STRIDE1["probe"]
    assert _close(logits.sum(), probe["sum"]) and _close(logits.abs().sum(), probe["abs_sum"])
    assert net(x, need_rep=True)["rep"].shape[-2:] == x.shape[-2:]


def test_checkpoint_from_before_rep_stride_resumes_to_the_same_losses(tmp_path):
    resume_and_compare(V2_STRIDE1, EXPECTED_STRIDE1, tmp_path / "resumed")


def test_a_checkpoint_keeps_the_rep_stride_it_names(tmp_path):
    st = checkpoint.load(V2_STRIDE1)
    st["config"]["unet_rep_stride"] = 4
    path = str(tmp_path / "stride4.pt")
    checkpoint.save(st, path)
    assert checkpoint.load(path)["config"]["unet_rep_stride"] == 4
