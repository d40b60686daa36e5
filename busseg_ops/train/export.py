"""`busseg export`: a checkpoint's network as a file that runs without busseg_ops: a torch.export
program (torch alone runs it) or its weights with their config (formats: docs/methods.md)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F

from . import augment, checkpoint, engine
from .config import TrainConfig
from .errors import UserError
from .evaluate import network_stride

MAX_SIDE, MAX_BATCH = 4096, 256
FORMATS = ("pt2", "state-dict")
INPUT = (
    f"float32 (B, 1, H, W) grayscale in [0, 1] (8-bit image / 255), 1 <= B <= {MAX_BATCH}, S < H, W <= {MAX_SIDE} "
    "with S the network's stride (U-Net 16, DeepLabv3+ 8, LA-Net 32): any size, padded to a multiple of S inside "
    "(a network trained with --fov N: resized inside to a longer side of N, aspect kept, the logits back to H, W)"
)
OUTPUT = "float32 (B, 2, H, W) logits of (background, lesion) at the input size; mask = argmax over dim 1"


class MaskLogits(torch.nn.Module):
    """A network of build_model as one function image → (B, 2, H, W) class logits, the way busseg
    evaluates it: zero-padded at the bottom and right to a multiple of its stride, cropped back. A
    sigmoid mask head (LA-Net) gives the logits (0, z), whose softmax is (1 − σ(z), σ(z)). With
    `fov` (the network's training field of view) the image is first resized as evaluate.predict
    does and the probabilities resized back; their logarithms are the logits (same softmax)."""

    def __init__(self, net: torch.nn.Module, fov: int = 0):
        super().__init__()
        self.net, self.stride, self.fov = net, network_stride(net), fov

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fov:
            return self.logits(x)
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=augment.fov_size(h, w, self.fov), mode="bilinear", align_corners=False)
        prob = F.interpolate(self.logits(small).softmax(1), size=(h, w), mode="bilinear", align_corners=False)
        return prob.log()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.stride  # the padded sides as multiples of s: torch.export then proves the grids' sizes
        out = self.net(F.pad(x, (0, (w + s - 1) // s * s - w, 0, (h + s - 1) // s * s - h)))
        if "pred" in out:
            logits = out["pred"]
        else:
            z = out["mask_logits"][:, :1]
            logits = torch.cat([torch.zeros_like(z), z], 1)
        # index_select, not slicing: a view's strides would make torch.export guard on whether the
        # size was a multiple of the stride, and specialise the program to one of the two cases
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        return logits.index_select(2, rows).index_select(3, cols)


def check_destination(path: str, src: str, overwrite: bool) -> None:
    """`path` may be written: not the checkpoint, not a link or a special file, not another file of a
    run; an existing regular file only with `overwrite`."""
    if os.path.lexists(path):
        same = os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src)  # a hard link too
        if same or os.path.realpath(path) == os.path.realpath(src):
            raise UserError(f"{path}: is the checkpoint being exported; write the export to another file")
        if os.path.islink(path):
            raise UserError(f"{path}: is a symbolic link; it is not replaced (remove it or choose another name)")
        if not os.path.isfile(path):
            raise UserError(f"{path}: is not a regular file (a folder, device or pipe); it is not replaced")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) in engine.RUN_FILES and engine.run_files(folder):
        raise UserError(f"{path}: is a file of the run in {folder}; write the export elsewhere")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it")


def _write_atomic(path: str, write) -> None:
    """checkpoint.write_atomic, a folder that cannot be written a one-line error."""
    try:
        checkpoint.write_atomic(path, write)
    except OSError as err:
        raise UserError(f"{path}: cannot write there ({err.strerror or err})") from None


def load_network(path: str, which: str = "teacher") -> tuple[torch.nn.Module, TrainConfig]:
    """The `which` network of a busseg checkpoint, its weights checked (present, fitting the network
    its config describes, finite), in eval mode, with its config."""
    st = checkpoint.load(path)
    checkpoint.require(st, ("config", which), path)
    cfg = TrainConfig.from_dict(st["config"], source=f"checkpoint {path}")
    checkpoint.check_finite(st[which], path, which)
    model = engine.build_model(cfg)
    try:
        model.load_state_dict(st[which])
    except RuntimeError as err:
        raise UserError(
            f"checkpoint {path}: the {which}'s weights do not fit the network its config describes "
            f"({' '.join(str(err).split())[:160]})"
        ) from None
    return model.eval(), cfg


def export(src: str, dst: str, which: str = "teacher", fmt: str = "pt2", overwrite: bool = False) -> dict:
    """Write checkpoint `src`'s `which` network to `dst` in format `fmt` (module docstring); returns
    what the export holds besides the weights (the config, input and output description)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "pt2" and not dst.endswith(".pt2"):
        raise UserError(
            f"{dst}: a torch.export program is written to a .pt2 file; name it {os.path.splitext(dst)[0]}.pt2, or "
            "pass --format state-dict for the weights alone"
        )
    check_destination(dst, src, overwrite)
    sidecar = os.path.splitext(dst)[0] + ".json"
    if fmt == "state-dict":
        if sidecar == dst:
            raise UserError(f"{dst}: the state dict and its config (.json) would be the same file")
        check_destination(sidecar, src, overwrite)
    model, cfg = load_network(src, which)
    if fmt == "pt2" and cfg.method == "semiseg_caw" and cfg.semiseg_caw.guide_map == "layercam":
        raise UserError(
            f"--format pt2: {src} is a SemiSeg-CAW guided by LayerCAM, whose forward takes a gradient, which "
            "torch.export cannot trace; pass --format state-dict"
        )
    meta = {
        "config": dataclasses.asdict(cfg),
        "which": which,
        "input": INPUT,
        "output": OUTPUT,
        "source": os.path.abspath(src),
    }
    if fmt == "state-dict":
        _write_atomic(dst, lambda f: torch.save(model.state_dict(), f))
        _write_atomic(sidecar, lambda f: f.write(json.dumps(dataclasses.asdict(cfg), indent=2).encode()))
        return meta
    program = export_program(model, cfg.fov)
    _write_atomic(dst, lambda f: torch.export.save(program, f, extra_files={"busseg.json": json.dumps(meta)}))
    return meta


def export_program(model: torch.nn.Module, fov: int = 0) -> torch.export.ExportedProgram:
    """torch.export of MaskLogits(model, fov) with a dynamic batch, height and width."""
    wrapped = MaskLogits(model.eval(), fov)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=wrapped.stride + 1, max=MAX_SIDE)
    width = torch.export.Dim("width", min=wrapped.stride + 1, max=MAX_SIDE)
    example = torch.rand(2, 1, 3 * wrapped.stride + 5, 2 * wrapped.stride + 3)  # odd sizes, not a stride multiple
    with torch.no_grad():
        return torch.export.export(wrapped, (example,), dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
