"""busseg_triton::patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md) in Triton: a program per
patch sums its pixels' normalised entropies (softmax fused for logits); backward is a per-pixel
program."""

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _validate
from ._float_args import join, split


@triton.jit
def _pixel_probs_stats(x_ptr, K, HW, mask, FROM_LOGITS: tl.constexpr, BLOCK: tl.constexpr):
    """Row max and exp-sum over classes (softmax) of a block of pixels; (0, 1) for probabilities."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    if FROM_LOGITS:
        for k in range(K):
            m = tl.maximum(m, tl.load(x_ptr + k * HW, mask=mask, other=0.0).to(tl.float32))
        for k in range(K):
            s += tl.exp(tl.load(x_ptr + k * HW, mask=mask, other=0.0).to(tl.float32) - m)
    else:
        m = tl.zeros([BLOCK], tl.float32)
        s = tl.full([BLOCK], 1.0, tl.float32)
    return m, s


@triton.jit
def _prob(x_ptr, k, HW, mask, m, s, FROM_LOGITS: tl.constexpr):
    v = tl.load(x_ptr + k * HW, mask=mask, other=0.0).to(tl.float32)
    if FROM_LOGITS:
        v = tl.exp(v - m) / s
    return v


@triton.jit
def _hardness_forward_kernel(
    x, out, K, H, W, PH, PW, NH, NW, scale_hi, scale_lo, eps_hi, eps_lo, FROM_LOGITS: tl.constexpr, BLOCK: tl.constexpr
):
    scale, eps = join(scale_hi, scale_lo, tl.float32), join(eps_hi, eps_lo, tl.float32)
    pid = tl.program_id(0)  # (b, i, j) patch
    b = pid // (NH * NW)
    i = (pid // NW) % NH
    j = pid % NW
    HW = H * W
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, PH * PW, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < PH * PW
        pix = (i * PH + idx // PW) * W + j * PW + idx % PW
        base = x + b * K * HW + pix
        m, s = _pixel_probs_stats(base, K, HW, mask, FROM_LOGITS, BLOCK)
        for k in range(K):
            p = _prob(base, k, HW, mask, m, s, FROM_LOGITS)
            acc += tl.where(mask, p * tl.log(p + eps), 0.0)
    tl.store(out + pid, tl.sum(acc, 0) * scale)


@triton.jit
def _hardness_backward_kernel(
    grad,
    x,
    dx,
    K,
    H,
    W,
    PH,
    PW,
    NH,
    NW,
    scale_hi,
    scale_lo,
    eps_hi,
    eps_lo,
    FROM_LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    scale, eps = join(scale_hi, scale_lo, tl.float32), join(eps_hi, eps_lo, tl.float32)
    b = tl.program_id(1)
    HW = H * W
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < HW
    y, xx = pix // W, pix % W
    c = scale * tl.load(grad + (b * NH + y // PH) * NW + xx // PW, mask=mask, other=0.0).to(tl.float32)
    base = x + b * K * HW + pix
    m, s = _pixel_probs_stats(base, K, HW, mask, FROM_LOGITS, BLOCK)
    dot = tl.zeros([BLOCK], tl.float32)
    if FROM_LOGITS:
        for k in range(K):
            p = _prob(base, k, HW, mask, m, s, FROM_LOGITS)
            dot += p * c * (tl.log(p + eps) + p / (p + eps))
    for k in range(K):
        p = _prob(base, k, HW, mask, m, s, FROM_LOGITS)
        dp = c * (tl.log(p + eps) + p / (p + eps))
        if FROM_LOGITS:
            dp = p * (dp - dot)
        tl.store(dx + b * K * HW + k * HW + pix, dp, mask=mask)


def _check(op, x, patch_h, patch_w, grad=None):
    """The checks of csrc/patch_entropy_hardness/checks.h, before any launch."""
    torch._check_value(x.dim() == 4 and x.shape[1] >= 2, lambda: f"{op}: x must be (B, K, H, W) with K >= 2")
    torch._check_type(x.is_floating_point(), lambda: f"{op}: x must be floating")
    torch._check_value(
        patch_h >= 1 and patch_w >= 1 and x.shape[2] % patch_h == 0 and x.shape[3] % patch_w == 0,
        lambda: f"{op}: patch size ({patch_h}, {patch_w}) must divide the map size {tuple(x.shape[2:])}",
    )
    if grad is not None:
        shape = (x.shape[0], x.shape[2] // patch_h, x.shape[3] // patch_w)
        torch._check_value(tuple(grad.shape) == shape, lambda: f"{op}: grad must be (B, Nh, Nw) = {shape}")
        torch._check_type(grad.is_floating_point(), lambda: f"{op}: grad must be floating")
        _validate.one_device(op, x=x, grad=grad)


@triton_op("busseg_triton::patch_entropy_hardness", mutates_args=())
def patch_entropy_hardness(x: torch.Tensor, patch_h: int, patch_w: int, from_logits: bool, eps: float) -> torch.Tensor:
    _check("patch_entropy_hardness", x, patch_h, patch_w)
    B, K, H, W = x.shape
    nh, nw = H // patch_h, W // patch_w
    out = torch.empty(B, nh, nw, dtype=torch.float32, device=x.device)
    wrap_triton(_hardness_forward_kernel)[(B * nh * nw,)](
        x.contiguous(),
        out,
        K,
        H,
        W,
        patch_h,
        patch_w,
        nh,
        nw,
        *split(-1.0 / (math.log(K) * patch_h * patch_w)),
        *split(eps),
        FROM_LOGITS=from_logits,
        # a lane per thread at least; at most 512 pixels at a time (blocks of 1024 spilled on sm_90)
        BLOCK=min(512, max(128, triton.next_power_of_2(patch_h * patch_w))),
    )
    return out.to(x.dtype)


@triton_op("busseg_triton::patch_entropy_hardness_backward", mutates_args=())
def patch_entropy_hardness_backward(
    grad: torch.Tensor, x: torch.Tensor, patch_h: int, patch_w: int, from_logits: bool, eps: float
) -> torch.Tensor:
    _check("patch_entropy_hardness_backward", x, patch_h, patch_w, grad)
    B, K, H, W = x.shape
    dx = torch.empty(B, K, H, W, dtype=torch.float32, device=x.device)
    block = 256
    wrap_triton(_hardness_backward_kernel)[(triton.cdiv(H * W, block), B)](
        grad.contiguous(),
        x.contiguous(),
        dx,
        K,
        H,
        W,
        patch_h,
        patch_w,
        H // patch_h,
        W // patch_w,
        *split(-1.0 / (math.log(K) * patch_h * patch_w)),
        *split(eps),
        FROM_LOGITS=from_logits,
        BLOCK=block,
    )
    return dx.to(x.dtype)


# ---- launch space: what the GPU compile check (tools/gpu_compile_check.py) compiles ------------

#: Problem axes that decide what the launchers above launch. First value: the base problem; second:
#: the smallest blocks. Square patches of side 16 give blocks of 256 pixels (base), then 128 (one
#: pixel, specialised), 512, and 512 in a loop.
LAUNCH_AXES = {
    "dtype": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "patch_side": (16, 1, 20, 40),
    "from_logits": (True, False),
}
#: The largest blocks, compiled in every dtype like the base.
LAUNCH_CORNERS = ({"patch_side": 40},)


def launch_stand_in(dtype, patch_side, from_logits):
    """Forward and backward launches on stand-in inputs: a 2 x 3 grid of square patches."""
    x = torch.zeros(1, 2, 2 * patch_side, 3 * patch_side, dtype=dtype)
    hardness = patch_entropy_hardness(x, patch_side, patch_side, from_logits, 1e-10)
    patch_entropy_hardness_backward(torch.ones_like(hardness), x, patch_side, patch_side, from_logits, 1e-10)
