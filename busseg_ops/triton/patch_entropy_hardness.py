"""busseg_triton::patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md) in Triton: a program per
patch walks it in 2-D tiles of BLOCK_H rows x BLOCK_W columns (rows contiguous: vector loads, no
division per pixel), summing its pixels' normalised entropies (softmax fused for logits);
backward walks the same tiles writing every pixel's gradient."""

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops.patch_entropy_hardness import check_args, check_backward_args
from ._float_args import join, split


@triton.jit
def _tile(base, b, i, j, r0, c0, K, H, W, PH, PW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Class 0's pointers into ``base`` (B, K, H, W) and the mask of the tile at rows r0..,
    columns c0.. of patch (i, j) of image b; class k is k * H * W further. The image's offset is
    int64, offsets within an image int32 (the launchers keep H * W below 2^31)."""
    rows = r0 + tl.arange(0, BLOCK_H)[:, None]
    cols = c0 + tl.arange(0, BLOCK_W)[None, :]
    mask = (rows < PH) & (cols < PW)
    return base + b.to(tl.int64) * K * H * W + (i * PH + rows) * W + j * PW + cols, mask


@triton.jit
def _softmax_stats(px, K, HW, mask, FROM_LOGITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Max and exp-sum over classes (softmax) of a tile of pixels; (0, 1) for probabilities."""
    if FROM_LOGITS:
        m = tl.full([BLOCK_H, BLOCK_W], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
        for k in range(K):
            m = tl.maximum(m, tl.load(px + k * HW, mask=mask, other=0.0).to(tl.float32))
        for k in range(K):
            s += tl.exp(tl.load(px + k * HW, mask=mask, other=0.0).to(tl.float32) - m)
    else:
        m = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
        s = tl.full([BLOCK_H, BLOCK_W], 1.0, tl.float32)
    return m, s


@triton.jit
def _prob(px, k, HW, mask, m, s, FROM_LOGITS: tl.constexpr):
    v = tl.load(px + k * HW, mask=mask, other=0.0).to(tl.float32)
    if FROM_LOGITS:
        v = tl.exp(v - m) / s
    return v


@triton.jit
def _hardness_forward_kernel(
    x,
    out,
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
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    scale, eps = join(scale_hi, scale_lo, tl.float32), join(eps_hi, eps_lo, tl.float32)
    pid = tl.program_id(0)  # (b, i, j) patch: one division per program
    b = pid // (NH * NW)
    i = (pid // NW) % NH
    j = pid % NW
    HW = H.to(tl.int64) * W
    acc = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    for r0 in range(0, PH, BLOCK_H):
        for c0 in range(0, PW, BLOCK_W):
            px, mask = _tile(x, b, i, j, r0, c0, K, H, W, PH, PW, BLOCK_H, BLOCK_W)
            m, s = _softmax_stats(px, K, HW, mask, FROM_LOGITS, BLOCK_H, BLOCK_W)
            for k in range(K):
                p = _prob(px, k, HW, mask, m, s, FROM_LOGITS)
                acc += tl.where(mask, p * tl.log(p + eps), 0.0)
    tl.store(out + pid, tl.sum(acc) * scale)


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
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    scale, eps = join(scale_hi, scale_lo, tl.float32), join(eps_hi, eps_lo, tl.float32)
    pid = tl.program_id(0)
    b = pid // (NH * NW)
    i = (pid // NW) % NH
    j = pid % NW
    HW = H.to(tl.int64) * W
    c = scale * tl.load(grad + pid).to(tl.float32)  # the patch's gradient, once
    for r0 in range(0, PH, BLOCK_H):
        for c0 in range(0, PW, BLOCK_W):
            px, mask = _tile(x, b, i, j, r0, c0, K, H, W, PH, PW, BLOCK_H, BLOCK_W)
            pdx, _ = _tile(dx, b, i, j, r0, c0, K, H, W, PH, PW, BLOCK_H, BLOCK_W)
            m, s = _softmax_stats(px, K, HW, mask, FROM_LOGITS, BLOCK_H, BLOCK_W)
            dot = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
            if FROM_LOGITS:
                for k in range(K):
                    p = _prob(px, k, HW, mask, m, s, FROM_LOGITS)
                    dot += p * c * (tl.log(p + eps) + p / (p + eps))
            for k in range(K):
                p = _prob(px, k, HW, mask, m, s, FROM_LOGITS)
                dp = c * (tl.log(p + eps) + p / (p + eps))
                if FROM_LOGITS:
                    dp = p * (dp - dot)
                tl.store(pdx + k * HW, dp, mask=mask)


def _check_pixels(x) -> None:
    """Offsets within an image are int32 here."""
    torch._check_value(x.shape[2] * x.shape[3] < 2**31, lambda: f"x must have H*W < 2^31 pixels, got {tuple(x.shape)}")


def _tile_shape(patch_h: int, patch_w: int) -> dict:
    """BLOCK_H x BLOCK_W tile of a patch: the patch's width (a power of two, at most 64) by as many
    rows as make at most 512 pixels (tiles of 1024 took 120 to 170 registers and spilled); four
    warps for 512 pixels, one for fewer (with two, ptxas kept 32 registers and spilled on sm_80)."""
    block_w = min(64, triton.next_power_of_2(patch_w))
    block_h = min(triton.next_power_of_2(patch_h), 512 // block_w)
    return dict(BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4 if block_h * block_w >= 512 else 1)


@triton_op("busseg_triton::patch_entropy_hardness", mutates_args=())
def patch_entropy_hardness(x: torch.Tensor, patch_h: int, patch_w: int, from_logits: bool, eps: float) -> torch.Tensor:
    check_args(x, patch_h, patch_w)
    _check_pixels(x)
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
        **_tile_shape(patch_h, patch_w),
    )
    return out.to(x.dtype)


@triton_op("busseg_triton::patch_entropy_hardness_backward", mutates_args=())
def patch_entropy_hardness_backward(
    grad: torch.Tensor, x: torch.Tensor, patch_h: int, patch_w: int, from_logits: bool, eps: float
) -> torch.Tensor:
    check_backward_args(grad, x, patch_h, patch_w)
    _check_pixels(x)
    B, K, H, W = x.shape
    nh, nw = H // patch_h, W // patch_w
    dx = torch.empty(B, K, H, W, dtype=torch.float32, device=x.device)
    wrap_triton(_hardness_backward_kernel)[(B * nh * nw,)](
        grad.contiguous(),
        x.contiguous(),
        dx,
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
        **_tile_shape(patch_h, patch_w),
    )
    return dx.to(x.dtype)
