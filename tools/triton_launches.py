"""The launch spaces of busseg_ops' Triton kernels, for tools/gpu_compile_check.py: per module of
busseg_ops/triton, the problem axes that decide what its launchers launch and a stand-in that calls
the launchers on one problem (the check intercepts every kernel launch, so nothing runs). Block
sizes and dtypes thus come from the launchers' own code, never from a copy here.

The Triton modules are imported inside the stand-ins, not at this module's import: Triton decides
at a kernel's decoration whether it runs in the interpreter, and the check sets that up first."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class LaunchSpace:
    #: axis name -> values; the first value of each is the base problem
    axes: dict
    #: stand_in(**point) calls the launchers on stand-in inputs of one problem
    stand_in: Callable
    #: points compiled in every dtype like the base (the largest blocks: the register worst case)
    corners: tuple = ()
    #: axes whose every value is a compile of its own (nothing to saturate): checked at their values
    unbounded: tuple = ()


def _launchers(op: str):
    return importlib.import_module(f"busseg_ops.triton.{op}")


def _matmul_precisions():
    """torch's float32 matmul precisions in turn (exact, and TF32: other tiles), restored after."""
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        for precision in ("ieee", "tf32"):
            torch.backends.cuda.matmul.fp32_precision = precision
            yield precision
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


# ---- adjacent_relation_propagation ----------------------------------------------------------------


def _arp(dtype, channels, classes, kernel_size, dilation, padding, width, gradients):
    """Forward and backward launches of one problem, on stand-in inputs."""
    arp = _launchers("adjacent_relation_propagation")
    feat = torch.zeros(1, channels, 5, width, dtype=dtype)
    value = torch.zeros(1, classes, 5, width, dtype=dtype)
    valid = padding == "valid"
    out, weights = arp.adjacent_relation_propagation(feat, value, kernel_size, dilation, 1.0, valid)
    arp.adjacent_relation_propagation_backward(
        out, feat, value, weights, kernel_size, dilation, 1.0, valid, gradients != "value", gradients != "feat"
    )


# First value: the base problem (on its 5 x 7 stand-in map, 256 channels are 8 groups of full
# chunks: no channel mask); the other channel counts give partial chunks in 1, 2, 4 and 8 groups
# (the softmax kernel's group blocks); value blocks of 1 and 4 (37: several); kernel sizes 1 and 3
# unrolled, 5 and 7 a run-time tap loop; dilation 1 is specialised (constant column offsets), 2
# halves the chunks; width 130 tiles the map in 8 x 32 blocks (7: whole rows); gradients: what the
# backward is asked for. Corners: the unrolled and the run-time tap loops with the largest blocks,
# at dilation 2 (per-tap addresses) and 1 (the widest chunks); the base on a wide map. Each kernel
# size is a compile of its own.
ARP = LaunchSpace(
    axes={
        "dtype": DTYPES,
        "channels": (256, 3, 7, 13, 31),
        "classes": (2, 1, 7, 37),
        "kernel_size": (3, 1, 5, 7),
        "dilation": (1, 2),
        "padding": ("zeros", "valid"),
        "width": (7, 130),
        "gradients": ("both", "feat", "value"),
    },
    stand_in=_arp,
    corners=(
        {"channels": 256, "classes": 37, "kernel_size": 3, "dilation": 2},
        {"channels": 256, "classes": 37, "kernel_size": 7, "dilation": 1},
        {"width": 130},
    ),
    unbounded=("kernel_size",),
)


# ---- cross_layer_alignment_loss -------------------------------------------------------------------


def _cra(dtype, proxies, layers):
    """Forward (with the proxy gradients it forms), forward alone and backward launches of one
    problem, on stand-in inputs of 37 pixel rows, under each float32 matmul precision."""
    cra = _launchers("cross_layer_alignment_loss")
    feats = [torch.zeros(1, 3, 37, dtype=dtype) for _ in range(layers)]
    proxy_rows = [torch.zeros(1, proxies, 3, dtype=dtype) for _ in range(layers)]
    grad_loss = torch.ones((), dtype=dtype)
    for _ in _matmul_precisions():
        cra.cross_layer_alignment_loss(feats, proxy_rows, "mean", 1e-10, 37, False)
        _, lse, _ = cra.cross_layer_alignment_loss(feats, proxy_rows, "mean", 1e-10, 37, True)
        cra.cross_layer_alignment_loss_backward(grad_loss, feats, proxy_rows, lse, "mean", 1e-10, 37, True, True)


# First value: the base problem (the upstream M = 64, L = 4); second: the smallest blocks. Proxies
# give fused tiles of 64 (base), 16 and 32 proxies, then the blocked path's row tiles of 128, 256,
# 512 and 1024 proxies, and wide rows; layers 2 to 4 are fused, 6 take the blocked path. Corners:
# the blocked path's largest tiles with more layers, and wide rows. The narrow and fused kernels
# unroll the layers: each count is a compile of its own.
CRA = LaunchSpace(
    axes={"dtype": DTYPES, "proxies": (64, 1, 20, 100, 200, 300, 1000, 1500), "layers": (4, 2, 3, 6)},
    stand_in=_cra,
    corners=({"proxies": 1000, "layers": 6}, {"proxies": 5000}),
    unbounded=("layers",),
)


# ---- memory_contrastive_loss ----------------------------------------------------------------------


def _mcl(dtype, dim):
    """Forward (Σ π n̂ not saved) and backward (formed again, and the negatives' gradient) launches
    on stand-in inputs with features of `dim`, under each float32 matmul precision."""
    mcl = _launchers("memory_contrastive_loss")
    anchors, negatives, positives = (torch.ones(n, dim, dtype=dtype) for n in (37, 41, 2))
    labels = torch.zeros(37, dtype=torch.int64), torch.ones(41, dtype=torch.int64)
    has_positive = torch.ones(2, dtype=torch.bool)
    args = (anchors, labels[0], negatives, labels[1], positives, has_positive, 0.5)
    for _ in _matmul_precisions():
        _, lse, _ = mcl.memory_contrastive_loss(*args, False)
        mcl.memory_contrastive_loss_backward(
            torch.ones((), dtype=dtype), *args[:6], lse, anchors.new_empty(0), 0.5, True
        )


# First value: the base problem; second: the smallest blocks. Features of 256 give feature-column
# blocks of 128 (tensor cores) and 64 (FMA: exact float32, float64), then 1, 12, 20, 40 and 100 the
# smaller blocks, 300 padding to whole blocks. Corner: the largest blocks with D padded.
MCL = LaunchSpace(axes={"dtype": DTYPES, "dim": (256, 1, 12, 20, 40, 100, 300)}, stand_in=_mcl, corners=({"dim": 300},))


# ---- patch_entropy_hardness -----------------------------------------------------------------------


def _peh(dtype, patch_h, patch_w, from_logits):
    """Forward and backward launches on stand-in inputs: a 2 x 3 grid of patches."""
    peh = _launchers("patch_entropy_hardness")
    x = torch.zeros(1, 2, 2 * patch_h, 3 * patch_w, dtype=dtype)
    hardness = peh.patch_entropy_hardness(x, patch_h, patch_w, from_logits, 1e-10)
    peh.patch_entropy_hardness_backward(torch.ones_like(hardness), x, patch_h, patch_w, from_logits, 1e-10)


# The tile comes from the patch's height and width (_tile_shape). First value: the base problem
# (16 x 16 tiles, one warp); second: the smallest (1 x 1); then 8 x 64 tiles for 20 x 40 patches
# and 16 x 32 for 40 x 20 (four warps, looping over rows), 4 x 64 for 3 x 64 (one warp). Corner: the
# largest tiles (and loops over them).
PEH = LaunchSpace(
    axes={
        "dtype": DTYPES,
        "patch_h": (16, 1, 20, 40, 3),
        "patch_w": (16, 1, 40, 20, 64),
        "from_logits": (True, False),
    },
    stand_in=_peh,
    corners=({"patch_h": 40, "patch_w": 40},),
)

#: module of busseg_ops/triton -> its launch space (the check fails on a module missing here)
SPACES = {
    "busseg_ops.triton.adjacent_relation_propagation": ARP,
    "busseg_ops.triton.cross_layer_alignment_loss": CRA,
    "busseg_ops.triton.memory_contrastive_loss": MCL,
    "busseg_ops.triton.patch_entropy_hardness": PEH,
}
