"""busseg_triton::adjacent_relation_propagation (RA-BUSSeg ARP; docs/ops.md) in Triton. A program
owns a block of pixels of one image: it gathers each tap's neighbour features by arithmetic
offsets (channels-last rows), keeps the k*k affinities of its pixels in registers for the
softmax, and sums the neighbours' values. Backward: per-pixel
affinity gradients, then gathers for the feature and value gradients (no atomics).

The taps are a loop, not unrolled: unrolled, the compiler keeps every tap's loads in flight (a
5x5 kernel spilled registers on sm_80/sm_90). Value channels go in blocks of at most
_MAX_BLOCK_K, so no kernel's registers grow with K. The dilation is a run-time argument (each
distinct value would be a compile of its own)."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _validate
from ._float_args import join, split


@triton.jit
def _neighbour(y, x, t, sign, H, W, KS: tl.constexpr, DIL):
    qy = y + sign * DIL * (t // KS - (KS - 1) // 2)
    qx = x + sign * DIL * (t % KS - (KS - 1) // 2)
    return qy * W + qx, (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)


@triton.jit
def _pixel_block(H, W, BLOCK_P: tl.constexpr):
    """This program's pixels of its image: index, in-image mask, row, column."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return p, p < H * W, p // W, p % W


@triton.jit
def _arp_forward_kernel(
    feat,
    value,
    out,
    weights,
    H,
    W,
    C,
    K,
    DIL,
    scale_hi,
    scale_lo,
    KS: tl.constexpr,
    VALID: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(1)
    HW = H * W
    scale = join(scale_hi, scale_lo, ACC)
    p, in_image, y, x = _pixel_block(H, W, BLOCK_P)
    taps = tl.arange(0, TAPS_PAD)
    affinity = tl.full([BLOCK_P, TAPS_PAD], float("-inf"), ACC)
    for t in range(KS * KS):
        q, inside = _neighbour(y, x, t, 1, H, W, KS, DIL)
        inside = inside & in_image
        dot = tl.zeros([BLOCK_P], ACC)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            fp = tl.load(
                feat + (b * HW + p)[:, None] * C + cs[None, :], mask=in_image[:, None] & (cs[None, :] < C), other=0.0
            )
            fq = tl.load(
                feat + (b * HW + q)[:, None] * C + cs[None, :], mask=inside[:, None] & (cs[None, :] < C), other=0.0
            )
            dot += tl.sum(fp.to(ACC) * fq.to(ACC), axis=1)
        a = dot * scale  # zeros padding: an outside neighbour has affinity 0
        if VALID:
            a = tl.where(inside, a, float("-inf"))
        affinity = tl.where(taps[None, :] == t, a[:, None], affinity)
    amax = tl.where(in_image, tl.max(affinity, axis=1), 0.0)  # rows past the image: all -inf
    e = tl.exp(affinity - amax[:, None])
    w = e / tl.sum(e, axis=1)[:, None]
    tl.store(
        weights + (b * KS * KS + taps[None, :]) * HW + p[:, None], w, mask=in_image[:, None] & (taps[None, :] < KS * KS)
    )
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_P, BLOCK_K], ACC)
        for t in range(KS * KS):
            q, inside = _neighbour(y, x, t, 1, H, W, KS, DIL)
            inside = inside & in_image
            w_t = tl.sum(tl.where(taps[None, :] == t, w, 0.0), axis=1)
            v = tl.load(
                value + (b * HW + q)[:, None] * K + ks[None, :], mask=inside[:, None] & (ks[None, :] < K), other=0.0
            )
            acc += w_t[:, None] * v.to(ACC)
        tl.store(out + (b * K + ks[None, :]) * HW + p[:, None], acc, mask=in_image[:, None] & (ks[None, :] < K))


@triton.jit
def _arp_affinity_grad_kernel(
    grad_out,
    value,
    weights,
    da,
    H,
    W,
    K,
    DIL,
    scale_hi,
    scale_lo,
    KS: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(1)
    HW = H * W
    scale = join(scale_hi, scale_lo, ACC)
    p, in_image, y, x = _pixel_block(H, W, BLOCK_P)
    taps = tl.arange(0, TAPS_PAD)
    tap_mask = in_image[:, None] & (taps[None, :] < KS * KS)
    w = tl.load(weights + (b * KS * KS + taps[None, :]) * HW + p[:, None], mask=tap_mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_P, TAPS_PAD], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        g = tl.load(
            grad_out + (b * K + ks[None, :]) * HW + p[:, None], mask=in_image[:, None] & (ks[None, :] < K), other=0.0
        ).to(ACC)
        for t in range(KS * KS):
            q, inside = _neighbour(y, x, t, 1, H, W, KS, DIL)
            v = tl.load(
                value + (b * HW + q)[:, None] * K + ks[None, :],
                mask=(inside & in_image)[:, None] & (ks[None, :] < K),
                other=0.0,
            )
            dw += tl.where(taps[None, :] == t, tl.sum(g * v.to(ACC), axis=1)[:, None], 0.0)
    wdw = tl.sum(w * dw, axis=1)
    tl.store(da + (b * HW + p)[:, None] * (KS * KS) + taps[None, :], scale * w * (dw - wdw[:, None]), mask=tap_mask)


@triton.jit
def _arp_feat_grad_kernel(
    feat,
    da,
    grad_feat,
    H,
    W,
    C,
    DIL,
    KS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(2)
    HW = H * W
    p, in_image, y, x = _pixel_block(H, W, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for t in range(KS * KS):
        for sign in tl.static_range(2):  # p as query of q (sign 0), p as key of q (sign 1)
            q, inside = _neighbour(y, x, t, 1 - 2 * sign, H, W, KS, DIL)
            inside = inside & in_image
            owner = p if sign == 0 else q
            d = tl.load(da + (b * HW + owner) * (KS * KS) + t, mask=inside, other=0.0)
            f = tl.load(
                feat + (b * HW + q)[:, None] * C + cs[None, :], mask=inside[:, None] & (cs[None, :] < C), other=0.0
            )
            acc += d[:, None] * f.to(ACC)
    tl.store(grad_feat + (b * HW + p)[:, None] * C + cs[None, :], acc, mask=in_image[:, None] & (cs[None, :] < C))


@triton.jit
def _arp_value_grad_kernel(
    grad_out,
    weights,
    grad_value,
    H,
    W,
    K,
    DIL,
    KS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(1)
    HW = H * W
    p, in_image, y, x = _pixel_block(H, W, BLOCK_P)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_P, BLOCK_K], ACC)
        for t in range(KS * KS):
            src, inside = _neighbour(y, x, t, -1, H, W, KS, DIL)  # the pixel whose tap t lands on p
            inside = inside & in_image
            w = tl.load(weights + (b * KS * KS + t) * HW + src, mask=inside, other=0.0)
            g = tl.load(
                grad_out + (b * K + ks[None, :]) * HW + src[:, None],
                mask=inside[:, None] & (ks[None, :] < K),
                other=0.0,
            )
            acc += w.to(ACC)[:, None] * g.to(ACC)
        tl.store(grad_value + (b * K + ks[None, :]) * HW + p[:, None], acc, mask=in_image[:, None] & (ks[None, :] < K))


_BLOCK_P = 32
_MAX_BLOCK_K = 16
# A block of 32 pixels by 4 channels is one element per thread of the 4 warps; narrower blocks
# would only replicate work, and each width is a compile of its own.
_MIN_BLOCK = 4


def _block_c(C: int) -> int:
    return min(64, max(_MIN_BLOCK, triton.next_power_of_2(C)))


def _block_k(K: int) -> int:
    return min(_MAX_BLOCK_K, max(_MIN_BLOCK, triton.next_power_of_2(K)))


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous()


def _check(op, feat, value, kernel_size, dilation, grad_out=None, weights=None):
    """The checks of csrc/adjacent_relation_propagation/checks.h, before any launch."""
    torch._check_value(feat.dim() == 4 and value.dim() == 4, lambda: f"{op}: feat and value must be 4-D")
    B, _, H, W = feat.shape
    torch._check_value(
        value.shape[0] == B and value.shape[2:] == feat.shape[2:],
        lambda: f"{op}: feat {tuple(feat.shape)} and value {tuple(value.shape)} must share batch and spatial sizes",
    )
    torch._check_value(
        1 <= kernel_size <= 32767 and kernel_size % 2 == 1,
        lambda: f"{op}: kernel_size must be odd and in [1, 32767], got {kernel_size}",
    )
    torch._check_value(
        1 <= dilation <= _validate.MAX_EXTENT // max(1, kernel_size // 2),
        lambda: f"{op}: dilation * (kernel_size // 2) must be in [1, 2**30], got dilation {dilation}",
    )
    torch._check_type(
        feat.is_floating_point() and value.dtype == feat.dtype, lambda: f"{op}: feat and value must share a float dtype"
    )
    if grad_out is None:
        _validate.one_device(op, feat=feat, value=value)
        return
    torch._check_value(grad_out.shape == (B, value.shape[1], H, W), lambda: f"{op}: grad_out must be (B, K, H, W)")
    torch._check_value(
        weights.shape == (B, kernel_size * kernel_size, H, W), lambda: f"{op}: weights must be (B, k*k, H, W)"
    )
    torch._check_type(
        grad_out.dtype == feat.dtype and weights.dtype == feat.dtype,
        lambda: f"{op}: grad_out and weights must have feat's dtype",
    )
    _validate.one_device(op, feat=feat, value=value, grad_out=grad_out, weights=weights)


@triton_op("busseg_triton::adjacent_relation_propagation", mutates_args=())
def adjacent_relation_propagation(
    feat: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int, scale: float, valid_padding: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check("adjacent_relation_propagation", feat, value, kernel_size, dilation)
    B, C, H, W = feat.shape
    K = value.shape[1]
    out = value.new_empty(B, K, H, W)
    weights = feat.new_empty(B, kernel_size * kernel_size, H, W)
    grid = (triton.cdiv(H * W, _BLOCK_P), B)
    wrap_triton(_arp_forward_kernel)[grid](
        _channels_last(feat),
        _channels_last(value),
        out,
        weights,
        H,
        W,
        C,
        K,
        dilation,
        *split(scale),
        KS=kernel_size,
        VALID=valid_padding,
        TAPS_PAD=triton.next_power_of_2(kernel_size * kernel_size),
        BLOCK_P=_BLOCK_P,
        BLOCK_C=_block_c(C),
        BLOCK_K=_block_k(K),
        ACC=_acc(feat),
    )
    return out, weights


@triton_op("busseg_triton::adjacent_relation_propagation_backward", mutates_args=())
def adjacent_relation_propagation_backward(
    grad_out: torch.Tensor,
    feat: torch.Tensor,
    value: torch.Tensor,
    weights: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
    valid_padding: bool,
    need_grad_feat: bool,
    need_grad_value: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check("adjacent_relation_propagation_backward", feat, value, kernel_size, dilation, grad_out, weights)
    B, C, H, W = feat.shape
    K = value.shape[1]
    grad_out = grad_out.contiguous()
    weights = weights.contiguous()
    block_k = _block_k(K)
    pixel_blocks = triton.cdiv(H * W, _BLOCK_P)
    grad_feat, grad_value = feat.new_empty(0), value.new_empty(0)
    if need_grad_feat:
        f = _channels_last(feat)
        acc_dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32
        da = torch.empty(B, H, W, kernel_size * kernel_size, dtype=acc_dtype, device=feat.device)
        wrap_triton(_arp_affinity_grad_kernel)[(pixel_blocks, B)](
            grad_out,
            _channels_last(value),
            weights,
            da,
            H,
            W,
            K,
            dilation,
            *split(scale),
            KS=kernel_size,
            TAPS_PAD=triton.next_power_of_2(kernel_size * kernel_size),
            BLOCK_P=_BLOCK_P,
            BLOCK_K=block_k,
            ACC=_acc(feat),
        )
        block_c = _block_c(C)
        grad_feat = feat.new_empty(B, H, W, C)
        wrap_triton(_arp_feat_grad_kernel)[(pixel_blocks, triton.cdiv(C, block_c), B)](
            f, da, grad_feat, H, W, C, dilation, KS=kernel_size, BLOCK_P=_BLOCK_P, BLOCK_C=block_c, ACC=_acc(feat)
        )
        grad_feat = grad_feat.permute(0, 3, 1, 2)
    if need_grad_value:
        grad_value = value.new_empty(B, K, H, W)
        wrap_triton(_arp_value_grad_kernel)[(pixel_blocks, B)](
            grad_out,
            weights,
            grad_value,
            H,
            W,
            K,
            dilation,
            KS=kernel_size,
            BLOCK_P=_BLOCK_P,
            BLOCK_K=block_k,
            ACC=_acc(feat),
        )
    return grad_feat, grad_value


# ---- launch space: what the GPU compile check (tools/gpu_compile_check.py) compiles ------------

#: Problem axes that decide what the launchers above launch. First value: the base problem; second:
#: the smallest blocks. Channels give blocks of 64 (base), 4, 8, 16 and 32; classes blocks of 4
#: (base), 4 with K = 1 (Triton specialises a 1), 8, and 16 (three blocks); dilation 1 is specialised.
LAUNCH_AXES = {
    "dtype": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "channels": (256, 3, 7, 13, 31),
    "classes": (2, 1, 7, 37),
    "kernel_size": (3, 1, 5, 7),
    "dilation": (1, 2),
    "padding": ("zeros", "valid"),
}
#: The largest blocks (the most registers), compiled in every dtype like the base.
LAUNCH_CORNERS = ({"channels": 256, "classes": 37, "kernel_size": 7, "dilation": 2},)
#: Each kernel size is a compile of its own; the values above are the ones checked.
UNBOUNDED_AXES = ("kernel_size",)


def launch_stand_in(dtype, channels, classes, kernel_size, dilation, padding):
    """Forward and backward launches of one problem, on stand-in inputs."""
    feat = torch.zeros(1, channels, 5, 7, dtype=dtype)
    value = torch.zeros(1, classes, 5, 7, dtype=dtype)
    valid = padding == "valid"
    out, weights = adjacent_relation_propagation(feat, value, kernel_size, dilation, 1.0, valid)
    adjacent_relation_propagation_backward(out, feat, value, weights, kernel_size, dilation, 1.0, valid, True, True)
