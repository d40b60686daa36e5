"""patch_entropy_hardness: PH-Net's patch-wise hardness (Eq. 4). Public function, fake kernels and
autograd of ``busseg::patch_entropy_hardness``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _validate
from ..backends import Op, autocast_inputs, dispatch, register
from ..reference.patch_entropy_hardness import patch_entropy_hardness as _reference

# Under autocast in float32, as torch's entropy-like ops (log, softmax).
OP = Op("patch_entropy_hardness", reference=_reference, autocast="float32")

# ---- contract: the arguments of busseg::patch_entropy_hardness and its backward ----------------
# Checked by the public function, the fake kernels and the Triton launchers alike; csrc/
# patch_entropy_hardness/checks.h guards direct calls of the C++ kernels with the same rules.


def check_map(x, allow_empty=False) -> None:
    """``x`` (B, K, H, W) floating with K >= 2 classes (the entropy is divided by log K); empty only
    with ``allow_empty`` (the ops compute nothing; the public function refuses it)."""
    _validate.tensor("x", x, 4, "(B, K, H, W)", allow_empty=allow_empty)
    if x.shape[1] < 2:
        raise ValueError(f"x needs K >= 2 classes (the entropy is divided by log K), got {x.shape[1]}")


def check_args(x, patch_h, patch_w) -> None:
    """``x`` as :func:`check_map` (empty allowed); a patch of ``patch_h`` x ``patch_w`` pixels (each
    in [1, 2^30]) that divides the map."""
    check_map(x, allow_empty=True)
    _validate.integer("patch_h", patch_h, minimum=1, maximum=_validate.MAX_EXTENT)
    _validate.integer("patch_w", patch_w, minimum=1, maximum=_validate.MAX_EXTENT)
    if x.shape[2] % patch_h or x.shape[3] % patch_w:
        raise ValueError(f"patch size ({patch_h}, {patch_w}) must divide the map size {tuple(x.shape[2:])}")


def check_backward_args(grad, x, patch_h, patch_w) -> None:
    """The forward's arguments and ``grad`` (B, Nh, Nw) floating, on x's device."""
    check_args(x, patch_h, patch_w)
    shape = (x.shape[0], x.shape[2] // patch_h, x.shape[3] // patch_w)
    _validate.tensor("grad", grad, 3, "(B, Nh, Nw)", allow_empty=True)
    if tuple(grad.shape) != shape:
        raise ValueError(f"grad must be (B, Nh, Nw) = {shape}, got {tuple(grad.shape)}")
    _validate.one_device(f"{OP.name}_backward", x=x, grad=grad)


def pair(name: str, v) -> tuple[int, int]:
    """An int or a pair of ints, each in [1, 2^30], as (h, w)."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    for e in v:
        _validate.integer(name, e, minimum=1, maximum=_validate.MAX_EXTENT)
    return int(v[0]), int(v[1])


def patch_size_of(shape_hw: Sequence[int], num_patches=None, patch_size=None) -> tuple[int, int]:
    """(h, w) of one patch of an H×W map cut into num_patches² patches or of patch_size pixels."""
    if (num_patches is None) == (patch_size is None):
        raise ValueError(
            "give exactly one of num_patches and patch_size, got "
            f"num_patches={num_patches!r}, patch_size={patch_size!r}"
        )
    H, W = shape_hw
    if num_patches is not None:
        nh, nw = pair("num_patches", num_patches)
        if H % nh or W % nw:
            raise ValueError(f"num_patches {nh}×{nw} does not divide the map size {H}×{W}")
        return H // nh, W // nw
    ph, pw = pair("patch_size", patch_size)
    if H % ph or W % pw:
        raise ValueError(f"patch_size {ph}×{pw} does not divide the map size {H}×{W}")
    return ph, pw


def patch_entropy_hardness(
    x: torch.Tensor, num_patches=None, patch_size=None, from_logits: bool = False, eps: float = 1e-10
) -> torch.Tensor:
    """PH-Net Eq. 4: the mean normalised pixel entropy of every patch, in [0, 1]::

        r[b, i, j] = −1/log K · mean over the patch's pixels of Σ_k p_k · log(p_k + eps)

    ``x`` (B, K, H, W) class probabilities, or logits with ``from_logits=True`` (softmax fused).
    Exactly one of ``num_patches`` (N: an N×N grid, or (Nh, Nw)) and ``patch_size`` ((h, w) or
    an int); the patches must divide the map. ``eps`` is a finite float > 0 (upstream: 1e-10).
    Returns (B, Nh, Nw). Differentiable. Every floating dtype (float16 / bfloat16 summed in
    float32); under torch.autocast ``x`` is cast to float32."""
    (x,) = autocast_inputs(OP, x)
    check_map(x)
    ph, pw = patch_size_of(x.shape[2:], num_patches, patch_size)
    # eps > 0: log(p + eps) of a zero probability (a softmax that underflowed, a one-hot map) is
    # then finite, and p·log(p + eps) 0; with eps = 0 it is 0·(−inf) = NaN.
    eps = _validate.real("eps", eps, positive=True)
    return dispatch(OP, x.device)(x, ph, pw, bool(from_logits), eps)


def _fake(x, patch_h, patch_w, from_logits, eps):
    check_args(x, patch_h, patch_w)
    return x.new_empty(x.shape[0], x.shape[2] // patch_h, x.shape[3] // patch_w)


def _fake_backward(grad, x, patch_h, patch_w, from_logits, eps):
    check_backward_args(grad, x, patch_h, patch_w)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.params = inputs[1:]


def _backward(backward_op):
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (backward_op(grad, x, *ctx.params),) + (None,) * 4

    return backward


register(OP, fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward)
