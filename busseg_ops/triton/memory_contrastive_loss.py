"""PH-Net ops (SPEC §3, §6) in Triton.

Hardness: a program per patch sums its pixels' normalised entropies (softmax fused for logits);
backward is a per-pixel program. Contrastive: a program per block of anchors streams blocks of
negatives through tl.dot with an online log-sum-exp (forward keeps only the per-anchor LSE); the
backward recomputes the tiles, once per anchor block for the anchor gradient and once per
negative block for the negative gradient (no atomics). The cosine normalisation, the positive
term and the class weights are O((N + N⁻)·D) torch ops around the kernels."""

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..phnet import register_contrastive_autograd, register_hardness_autograd

# ---- hardness --------------------------------------------------------------------------------


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
    x, out, K, H, W, PH, PW, NH, NW, scale, eps, FROM_LOGITS: tl.constexpr, BLOCK: tl.constexpr
):
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
    grad, x, dx, K, H, W, PH, PW, NH, NW, scale, eps, FROM_LOGITS: tl.constexpr, BLOCK: tl.constexpr
):
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


@triton_op("busseg::patch_entropy_hardness_forward_triton", mutates_args=())
def patch_entropy_hardness_forward_triton(
    x: torch.Tensor, patch_h: int, patch_w: int, from_logits: bool, eps: float
) -> torch.Tensor:
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
        -1.0 / (math.log(K) * patch_h * patch_w),
        eps,
        FROM_LOGITS=from_logits,
        BLOCK=min(1024, triton.next_power_of_2(patch_h * patch_w)),
    )
    return out.to(x.dtype)


@triton_op("busseg::patch_entropy_hardness_backward_triton", mutates_args=())
def patch_entropy_hardness_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, patch_h: int, patch_w: int, from_logits: bool, eps: float
) -> torch.Tensor:
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
        -1.0 / (math.log(K) * patch_h * patch_w),
        eps,
        FROM_LOGITS=from_logits,
        BLOCK=block,
    )
    return dx.to(x.dtype)


register_hardness_autograd("busseg::patch_entropy_hardness_forward_triton", patch_entropy_hardness_backward_triton)


# ---- memory contrastive loss -----------------------------------------------------------------


@triton.jit
def _sim_tile(a_tile, n, yn, j0, M, D, ya, inv_tau, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_M) logits <â_i, n̂_j>/τ of one negative block, and which count."""
    cols = j0 + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    n_tile = tl.load(n + cols[:, None] * D + ds[None, :], mask=(cols[:, None] < M) & (ds[None, :] < D), other=0.0)
    s = tl.dot(a_tile, tl.trans(n_tile), input_precision="ieee") * inv_tau
    labels = tl.load(yn + cols, mask=cols < M, other=0)
    counted = (cols[None, :] < M) & (labels[None, :] != ya[:, None])
    return s, counted, n_tile


@triton.jit
def _contrastive_forward_kernel(
    a, n, ya_ptr, yn, pos, lse, N, M, D, inv_tau, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.arange(0, BLOCK_D)
    a_tile = tl.load(a + rows[:, None] * D + ds[None, :], mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
    ya = tl.load(ya_ptr + rows, mask=rows < N, other=0)
    m = tl.load(pos + rows, mask=rows < N, other=0.0)  # the positive term starts the sum
    s = tl.full([BLOCK_N], 1.0, m.dtype)
    for j0 in range(0, M, BLOCK_M):
        logits, counted, _ = _sim_tile(a_tile, n, yn, j0, M, D, ya, inv_tau, BLOCK_M, BLOCK_D)
        logits = tl.where(counted, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
    tl.store(lse + rows, m + tl.log(s), mask=rows < N)


@triton.jit
def _anchor_block(a, ya_ptr, lse, coef, rows, N, D, BLOCK_D: tl.constexpr):
    """A block of normalised anchors (rows, BLOCK_D) with their labels, LSE and gradient coefficients."""
    ds = tl.arange(0, BLOCK_D)
    a_tile = tl.load(a + rows[:, None] * D + ds[None, :], mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
    ya = tl.load(ya_ptr + rows, mask=rows < N, other=0)
    l = tl.load(lse + rows, mask=rows < N, other=0.0)
    c = tl.load(coef + rows, mask=rows < N, other=0.0)
    return a_tile, ya, l, c


@triton.jit
def _contrastive_anchor_grad_kernel(
    a,
    n,
    ya_ptr,
    yn,
    lse,
    coef,
    da,
    N,
    M,
    D,
    inv_tau,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.arange(0, BLOCK_D)
    tile_mask = (rows[:, None] < N) & (ds[None, :] < D)
    a_tile, ya, l, c = _anchor_block(a, ya_ptr, lse, coef, rows, N, D, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], a_tile.dtype)
    for j0 in range(0, M, BLOCK_M):
        logits, counted, n_tile = _sim_tile(a_tile, n, yn, j0, M, D, ya, inv_tau, BLOCK_M, BLOCK_D)
        g = tl.where(counted & (c[:, None] != 0), c[:, None] * tl.exp(logits - l[:, None]), 0.0)
        acc += tl.dot(g.to(n_tile.dtype), n_tile, input_precision="ieee")
    prev = tl.load(da + rows[:, None] * D + ds[None, :], mask=tile_mask, other=0.0)
    tl.store(da + rows[:, None] * D + ds[None, :], prev + acc, mask=tile_mask)


@triton.jit
def _contrastive_negative_grad_kernel(
    a,
    n,
    ya_ptr,
    yn,
    lse,
    coef,
    dn,
    N,
    M,
    D,
    inv_tau,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    n_tile = tl.load(n + cols[:, None] * D + ds[None, :], mask=(cols[:, None] < M) & (ds[None, :] < D), other=0.0)
    labels = tl.load(yn + cols, mask=cols < M, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], n_tile.dtype)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        a_tile, ya, l, c = _anchor_block(a, ya_ptr, lse, coef, rows, N, D, BLOCK_D)
        logits = tl.dot(a_tile, tl.trans(n_tile), input_precision="ieee") * inv_tau
        counted = (rows[:, None] < N) & (cols[None, :] < M) & (labels[None, :] != ya[:, None])
        g = tl.where(counted & (c[:, None] != 0), c[:, None] * tl.exp(logits - l[:, None]), 0.0)
        acc += tl.dot(tl.trans(g.to(a_tile.dtype)), a_tile, input_precision="ieee")
    tl.store(dn + cols[:, None] * D + ds[None, :], acc, mask=(cols[:, None] < M) & (ds[None, :] < D))


_BLOCK_N = _BLOCK_M = 32
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def _prepare(anchors, anchor_labels, negatives, positives, has_positive, temperature):
    """Normalised anchors/negatives, the positive logits pos_i and the anchor weights w_i
    (the same quantities as csrc/contrastive_driver.h)."""
    K = positives.shape[0]
    a = (anchors / anchors.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)).contiguous()
    n = (negatives / negatives.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)).contiguous()
    p = positives / positives.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    lab = anchor_labels.clamp(0, K - 1)
    valid = (anchor_labels >= 0) & (anchor_labels < K) & has_positive[lab]
    pos = (a * p[lab]).sum(1) / temperature
    counts = torch.zeros(K, dtype=a.dtype, device=a.device).index_add_(0, lab, valid.to(a.dtype))
    classes = (counts > 0).sum().clamp_min(1).to(a.dtype)
    weight = torch.where(valid, 1.0 / (counts[lab].clamp_min(1) * classes), 0.0)
    return a, n, p, lab, pos, weight


def _normalize_backward(x, xhat, dxhat):
    norm = x.norm(dim=1, keepdim=True)
    proj = dxhat - xhat * (xhat * dxhat).sum(1, keepdim=True)
    return torch.where(norm > _NORM_EPS, proj, dxhat) / norm.clamp_min(_NORM_EPS)


def _blocks(D):
    return dict(BLOCK_N=_BLOCK_N, BLOCK_M=_BLOCK_M, BLOCK_D=max(16, triton.next_power_of_2(D)))


@triton_op("busseg::memory_contrastive_forward_triton", mutates_args=())
def memory_contrastive_forward_triton(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    positives: torch.Tensor,
    has_positive: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    a, n, _, _, pos, weight = _prepare(anchors, anchor_labels, negatives, positives, has_positive, temperature)
    N, D = a.shape
    lse = torch.empty_like(pos)
    if N > 0:
        wrap_triton(_contrastive_forward_kernel)[(triton.cdiv(N, _BLOCK_N),)](
            a,
            n,
            anchor_labels.contiguous(),
            negative_labels.contiguous(),
            pos.contiguous(),
            lse,
            N,
            n.shape[0],
            D,
            1.0 / temperature,
            **_blocks(D),
        )
    loss = (weight * torch.where(weight > 0, lse - pos, 0.0)).sum()
    return loss, lse


@triton_op("busseg::memory_contrastive_backward_triton", mutates_args=())
def memory_contrastive_backward_triton(
    grad_loss: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    positives: torch.Tensor,
    has_positive: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    need_grad_negatives: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    a, n, p, lab, pos, weight = _prepare(anchors, anchor_labels, negatives, positives, has_positive, temperature)
    N, D = a.shape
    M = n.shape[0]
    coef = (grad_loss.to(a.dtype) * weight / temperature).contiguous()
    pi_pos = torch.where(weight > 0, (pos - lse).exp(), 1.0)
    da = ((coef * (pi_pos - 1))[:, None] * p[lab]).contiguous()
    ya, yn = anchor_labels.contiguous(), negative_labels.contiguous()
    args = (a, n, ya, yn, lse.contiguous(), coef)
    if N > 0 and M > 0:
        wrap_triton(_contrastive_anchor_grad_kernel)[(triton.cdiv(N, _BLOCK_N),)](
            *args, da, N, M, D, 1.0 / temperature, **_blocks(D)
        )
    grad_negatives = anchors.new_empty(0)
    if need_grad_negatives:
        dn = torch.zeros_like(n)
        if N > 0 and M > 0:
            wrap_triton(_contrastive_negative_grad_kernel)[(triton.cdiv(M, _BLOCK_M),)](
                *args, dn, N, M, D, 1.0 / temperature, **_blocks(D)
            )
        grad_negatives = _normalize_backward(negatives, n, dn)
    return _normalize_backward(anchors, a, da), grad_negatives


register_contrastive_autograd("busseg::memory_contrastive_forward_triton", memory_contrastive_backward_triton)
