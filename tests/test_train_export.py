"""`busseg export` writes a torch.export program that a fresh Python with torch alone (busseg_ops
not importable) loads and runs, giving the mask logits busseg's own evaluation gives."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from busseg_ops.train import cli, config, engine, export
from busseg_ops.train.evaluate import predict

# Images of several sizes (odd, not multiples of any stride) and batch sizes.
SHAPES = [(1, 1, 37, 53), (3, 1, 64, 41), (2, 1, 101, 70)]

# The child: no site-packages (-S), no user or cwd paths (-I); only torch's own folder on the path,
# and busseg_ops (installed editable in the venv) checked to be out of reach before loading.
CHILD = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("busseg_ops") is None, "busseg_ops is importable in the child"
import torch
extra = {"busseg.json": ""}
program = torch.export.load(sys.argv[2], extra_files=extra)
inputs = torch.load(sys.argv[3], weights_only=True)
outputs = [program.module()(x) for x in inputs]
torch.save(outputs, sys.argv[4])
loaded = [m for m in sys.modules if "busseg" in m]
print(json.dumps({"meta": json.loads(extra["busseg.json"]), "busseg_loaded": loaded}))
"""


def _networks(tmp_path):
    """Two checkpoints: a U-Net (softmax head) and LA-Net (sigmoid head) on a U-Net encoder taking
    ImageNet-normalised 3 channels (the gray conversion inside); both of stride 16."""
    out = {}
    for name, kw in {
        "unet": dict(method="rabusseg", model="unet", unet_base=4, proj_dim=8, rep_dim=8),
        "lanet": dict(method="lanet", backbone="unet", unet_base=4, in_channels=3),
        # token maps made contiguous: a strided view made torch.export guard on the size
        "unext": dict(method="semiseg_caw", model="unext"),
        # trained on images resized to a longer side of 48: the program resizes as busseg eval does
        "unet_fov": dict(method="suponly", model="unet", unet_base=4, fov=48),
    }.items():
        cfg = config.TrainConfig(**kw, out=str(tmp_path / name))
        model = engine.build_model(cfg)
        for m in model.modules():  # non-trivial batch-norm statistics: eval mode must be what is exported
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        path = tmp_path / f"{name}.pt"
        engine.checkpoint.save(
            {"config": dataclasses.asdict(cfg), "teacher": model.state_dict(), "student": {}}, str(path)
        )
        out[name] = (path, model.eval())
    return out


@pytest.mark.slow
def test_pt2_export_runs_without_busseg_ops_and_matches_busseg_eval(tmp_path, capsys):
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    inputs = [torch.rand(s) for s in SHAPES]
    inputs_path = tmp_path / "inputs.pt"
    torch.save(inputs, inputs_path)
    for name, (ckpt, model) in _networks(tmp_path).items():
        dst = tmp_path / f"{name}.pt2"
        assert cli.main(["export", str(ckpt), str(dst)]) == 0
        assert "torch.export.load" in capsys.readouterr().out
        got_path = tmp_path / f"{name}_out.pt"
        r = subprocess.run(
            [sys.executable, "-I", "-S", "-c", CHILD, torch_dir, str(dst), str(inputs_path), str(got_path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(tmp_path),
        )
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert report["busseg_loaded"] == []
        assert (
            report["meta"]["config"]["method"]
            == {"unet": "rabusseg", "lanet": "lanet", "unext": "semiseg_caw", "unet_fov": "suponly"}[name]
        )
        assert report["meta"]["input"] == export.INPUT
        got = torch.load(got_path, weights_only=True)
        for x, logits in zip(inputs, got):
            assert logits.shape == (x.shape[0], 2, *x.shape[-2:]) and logits.dtype == torch.float32
            want = predict(model, x, fov=report["meta"]["config"]["fov"])["prob"]  # busseg eval: each image at its size
            torch.testing.assert_close(torch.softmax(logits, 1), want, rtol=1e-4, atol=1e-5)
        # The inference forward calls no busseg op (ARP and CRA are training losses): ATen only.
        graph = torch.export.load(str(dst)).graph
        ops = {n.target for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
        assert ops and {op.namespace for op in ops} == {"aten"}, sorted(map(str, ops))
    with pytest.raises(AssertionError, match="Guard failed"):  # a size the program does not take: refused
        torch.export.load(str(tmp_path / "lanet.pt2")).module()(torch.rand(1, 1, 16, 64))


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="phnet", model="deeplab", backbone="resnet18", in_channels=3),
        dict(method="semiseg_caw", model="unet", unet_base=4),
        dict(method="suponly", model="unet", unet_base=4, in_channels=3),
        dict(method="suponly", model="malunet", in_channels=3),
        dict(method="semiseg_caw", model="unext"),
    ],
)
def test_mask_logits_is_busseg_evaluation_for_every_network(kw):
    """What the program computes, for the networks not exported above: the padding to the stride
    and the crop back, and a 3-channel network's gray input, as busseg's evaluation."""
    model = engine.build_model(config.TrainConfig(**kw, proj_dim=8, rep_dim=8)).eval()
    wrapped = export.MaskLogits(model)
    for shape in SHAPES:
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(torch.softmax(wrapped(x), 1), predict(model, x)["prob"], rtol=1e-5, atol=1e-6)
