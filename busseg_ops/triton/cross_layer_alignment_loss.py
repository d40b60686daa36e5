"""busseg_triton::cross_layer_alignment_loss (RA-BUSSeg CRA; docs/ops.md) in Triton, with the
contract of the native op: the per-row log-sum-exp (L, B, HW) kept for backward, the logits never
stored. Tensor-core products of at most _MAX_LAYERS layers of _FUSED_MAX_M proxies (upstream: 4
and 64) take one fused kernel that does everything after the logits in registers; the rest (exact
float32 and float64 products, whose fused forms spilled registers, more layers, wider rows) keeps
the blocked path of csrc/common/cra_driver.h. How both work: docs/kernels.md."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops.cross_layer_alignment_loss import check_args, check_backward_args
from ._float_args import join, split
from ._precision import dot_precision


@triton.jit
def _row_lse(z):
    zmax = tl.max(z, axis=1)
    infinite = (zmax == float("inf")) | (zmax == float("-inf"))  # no finite shift exists
    shift = tl.where(infinite, 0.0, zmax)
    return tl.where(infinite, zmax, shift + tl.log(tl.sum(tl.exp(z - shift[:, None]), axis=1)))


@triton.jit
def _load_layer(logits, l, r, ms, R, M, ACC: tl.constexpr):
    mask = (r < R)[:, None] & (ms < M)[None, :]
    return tl.load(logits + (l * R + r)[:, None] * M + ms[None, :], mask=mask, other=float("-inf")).to(ACC)


@triton.jit
def _kl_term(q, log_q, log_p_eps):
    return tl.where((q > 0) | (q != q), q * (log_q - log_p_eps), 0.0)


@triton.jit
def _chunked_lse(logits, l, r, R, M, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """_row_lse of layer l's rows, read in chunks of BLOCK_M proxies: the same shift (the row max)
    in a first pass, the sum of exponentials in a second."""
    zmax = tl.full([BLOCK_R, BLOCK_M], float("-inf"), ACC)
    for m0 in range(0, M, BLOCK_M):
        zmax = tl.maximum(zmax, _load_layer(logits, l, r, m0 + tl.arange(0, BLOCK_M), R, M, ACC))
    zmax = tl.max(zmax, axis=1)
    infinite = (zmax == float("inf")) | (zmax == float("-inf"))
    shift = tl.where(infinite, 0.0, zmax)
    total = tl.zeros([BLOCK_R, BLOCK_M], ACC)
    for m0 in range(0, M, BLOCK_M):
        total += tl.exp(_load_layer(logits, l, r, m0 + tl.arange(0, BLOCK_M), R, M, ACC) - shift[:, None])
    return tl.where(infinite, zmax, shift + tl.log(tl.sum(total, axis=1)))


@triton.jit
def _align_forward_kernel(
    logits,
    lse,
    row_loss,
    R,
    M,
    eps_hi,
    eps_lo,
    L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    eps = join(eps_hi, eps_lo, ACC)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = tl.arange(0, BLOCK_M)
    z_prev = _load_layer(logits, 0, r, ms, R, M, ACC)
    lse_prev = _row_lse(z_prev)
    tl.store(lse + r, lse_prev, mask=r < R)
    total = tl.zeros([BLOCK_R], ACC)
    for l in tl.static_range(1, L):
        z = _load_layer(logits, l, r, ms, R, M, ACC)
        lse_l = _row_lse(z)
        tl.store(lse + l * R + r, lse_l, mask=r < R)
        log_q = z - lse_l[:, None]
        p = tl.exp(z_prev - lse_prev[:, None])
        term = _kl_term(tl.exp(log_q), log_q, tl.log(p + eps))
        total += tl.sum(tl.where((ms < M)[None, :], term, 0.0), axis=1)
        z_prev = z
        lse_prev = lse_l
    tl.store(row_loss + r, total, mask=r < R)


@triton.jit
def _align_forward_wide_kernel(
    logits, lse, row_loss, R, M, eps_hi, eps_lo, L, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr
):
    """_align_forward_kernel for rows of more than BLOCK_M proxies (layers in a loop: unrolled, the
    passes of every layer made the code large enough to spill)."""
    eps = join(eps_hi, eps_lo, ACC)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    lse_prev = _chunked_lse(logits, 0, r, R, M, BLOCK_R, BLOCK_M, ACC)
    tl.store(lse + r, lse_prev, mask=r < R)
    total = tl.zeros([BLOCK_R, BLOCK_M], ACC)
    for l in range(1, L):
        lse_l = _chunked_lse(logits, l, r, R, M, BLOCK_R, BLOCK_M, ACC)
        tl.store(lse + l * R + r, lse_l, mask=r < R)
        for m0 in range(0, M, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            log_q = _load_layer(logits, l, r, ms, R, M, ACC) - lse_l[:, None]
            p = tl.exp(_load_layer(logits, l - 1, r, ms, R, M, ACC) - lse_prev[:, None])
            term = _kl_term(tl.exp(log_q), log_q, tl.log(p + eps))
            total += tl.where((ms < M)[None, :], term, 0.0)
        lse_prev = lse_l
    tl.store(row_loss + r, tl.sum(total, axis=1), mask=r < R)


@triton.jit
def _align_backward_kernel(
    grad_loss,
    logits,
    lse,
    grad,
    R,
    M,
    eps_hi,
    eps_lo,
    norm_hi,
    norm_lo,
    L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    eps, norm = join(eps_hi, eps_lo, ACC), join(norm_hi, norm_lo, ACC)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = tl.arange(0, BLOCK_M)
    mask = (r < R)[:, None] & (ms < M)[None, :]
    coef = tl.load(grad_loss).to(ACC) * norm
    z_cur = _load_layer(logits, 0, r, ms, R, M, ACC)
    lse_cur = tl.load(lse + r, mask=r < R, other=0.0).to(ACC)
    p_prev = tl.zeros([BLOCK_R, BLOCK_M], ACC)  # P_{l-1}
    qu_prev = tl.zeros([BLOCK_R], ACC)  # <q, u> of pair l-1
    for l in tl.static_range(L):
        log_x = z_cur - lse_cur[:, None]
        x = tl.exp(log_x)  # P_l
        g = tl.zeros([BLOCK_R, BLOCK_M], ACC)
        if l > 0:  # layer l is the target of pair l-1: x (u - <x, u>), u = log x - log(p + eps)
            u = tl.where((x > 0) | (x != x), log_x - tl.log(p_prev + eps), 0.0)
            g += x * (u - qu_prev[:, None])
        z_next = z_cur
        lse_next = lse_cur
        if l + 1 < L:  # layer l is the input of pair l: x (h - <x, h>), h = -q / (x + eps)
            z_next = _load_layer(logits, l + 1, r, ms, R, M, ACC)
            lse_next = tl.load(lse + (l + 1) * R + r, mask=r < R, other=0.0).to(ACC)
            log_q = z_next - lse_next[:, None]
            q = tl.exp(log_q)
            h = -q / (x + eps)
            ph = tl.sum(tl.where(mask, x * h, 0.0), axis=1)
            g += x * (h - ph[:, None])
            qu_prev = tl.sum(tl.where(mask, _kl_term(q, log_q, tl.log(x + eps)), 0.0), axis=1)
        tl.store(grad + (l * R + r)[:, None] * M + ms[None, :], coef * g, mask=mask)
        p_prev = x
        z_cur = z_next
        lse_cur = lse_next


@triton.jit
def _align_backward_wide_kernel(
    grad_loss,
    logits,
    lse,
    grad,
    R,
    M,
    eps_hi,
    eps_lo,
    norm_hi,
    norm_lo,
    L,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    """_align_backward_kernel for rows of more than BLOCK_M proxies: per layer, a pass for the row
    sums <x, h> and <q, u> of the pair it is the input of, then a pass writing the gradients."""
    eps, norm = join(eps_hi, eps_lo, ACC), join(norm_hi, norm_lo, ACC)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    coef = tl.load(grad_loss).to(ACC) * norm
    lse_prev = tl.zeros([BLOCK_R], ACC)
    qu_prev = tl.zeros([BLOCK_R], ACC)  # <q, u> of pair l-1
    for l in range(L):
        lse_cur = tl.load(lse + l * R + r, mask=r < R, other=0.0).to(ACC)
        lse_next = lse_cur
        ph = tl.zeros([BLOCK_R, BLOCK_M], ACC)
        qu = tl.zeros([BLOCK_R, BLOCK_M], ACC)
        if l + 1 < L:
            lse_next = tl.load(lse + (l + 1) * R + r, mask=r < R, other=0.0).to(ACC)
            for m0 in range(0, M, BLOCK_M):
                ms = m0 + tl.arange(0, BLOCK_M)
                mask = (r < R)[:, None] & (ms < M)[None, :]
                x = tl.exp(_load_layer(logits, l, r, ms, R, M, ACC) - lse_cur[:, None])
                log_q = _load_layer(logits, l + 1, r, ms, R, M, ACC) - lse_next[:, None]
                q = tl.exp(log_q)
                ph += tl.where(mask, x * (-q / (x + eps)), 0.0)
                qu += tl.where(mask, _kl_term(q, log_q, tl.log(x + eps)), 0.0)
        ph = tl.sum(ph, axis=1)
        for m0 in range(0, M, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            mask = (r < R)[:, None] & (ms < M)[None, :]
            log_x = _load_layer(logits, l, r, ms, R, M, ACC) - lse_cur[:, None]
            x = tl.exp(log_x)
            g = tl.zeros([BLOCK_R, BLOCK_M], ACC)
            if l > 0:  # as in _align_backward_kernel
                p_prev = tl.exp(_load_layer(logits, l - 1, r, ms, R, M, ACC) - lse_prev[:, None])
                u = tl.where((x > 0) | (x != x), log_x - tl.log(p_prev + eps), 0.0)
                g += x * (u - qu_prev[:, None])
            if l + 1 < L:
                q = tl.exp(_load_layer(logits, l + 1, r, ms, R, M, ACC) - lse_next[:, None])
                g += x * (-q / (x + eps) - ph[:, None])
            tl.store(grad + (l * R + r)[:, None] * M + ms[None, :], coef * g, mask=mask)
        qu_prev = tl.sum(qu, axis=1)
        lse_prev = lse_cur


# ---- the fused kernel (rows of at most _FUSED_MAX_M proxies) ------------------------------------


@triton.jit
def _pick(l: tl.constexpr, x0, x1, x2, x3):
    """Argument slot l (a compile-time index) of the per-layer arguments."""
    x = x0
    if l == 1:
        x = x1
    if l == 2:
        x = x2
    if l == 3:
        x = x3
    return x


@triton.jit
def _layer_logits(
    f,
    f_sb,
    f_sc,
    f_sr,
    C,
    p,
    b,
    rows,
    row_end,
    M,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """(rows, proxies) logits <f[b, :, r], p[b, m, :]> of one layer, -inf at padded proxies: f a
    (B, C, HW) map of any strides, p (B, M, C) contiguous; the product over chunks of BLOCK_C
    channels."""
    ms = tl.arange(0, BLOCK_M)
    cs = tl.arange(0, BLOCK_C)
    f_rows = f + b.to(tl.int64) * f_sb + rows.to(tl.int64)[:, None] * f_sr
    p_rows = p + (b.to(tl.int64) * M + ms[:, None]) * C
    z = tl.zeros([rows.shape[0], BLOCK_M], ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cs
        ft = tl.load(
            f_rows + cc.to(tl.int64)[None, :] * f_sc, mask=(rows < row_end)[:, None] & (cc < C)[None, :], other=0.0
        )
        pt = tl.load(p_rows + cc[None, :], mask=(ms < M)[:, None] & (cc < C)[None, :], other=0.0)
        z = tl.dot(ft, tl.trans(pt), z, input_precision=PRECISION, out_dtype=ACC)
    return tl.where((ms < M)[None, :], z, float("-inf"))


@triton.jit
def _align_fused_kernel(
    f0, f0_sb, f0_sc, f0_sr, C0, p0,
    f1, f1_sb, f1_sc, f1_sr, C1, p1,
    f2, f2_sb, f2_sc, f2_sr, C2, p2,
    f3, f3_sb, f3_sc, f3_sr, C3, p3,
    lse,
    block_loss,
    grad,
    grad_loss,
    B,
    HW,
    M,
    r0,
    n,
    eps_hi,
    eps_lo,
    norm_hi,
    norm_lo,
    L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FORWARD: tl.constexpr,
    GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """A program per (block of pixel rows of [r0, r0 + n), image b). FORWARD: the rows' log-sum-exp
    of every layer into lse (L, B, HW) and the block's sum of KL terms into block_loss (B, blocks);
    else the log-sum-exp is read from lse. GRAD: grad (L, B, n, M) = grad_loss · norm · the logit
    gradients (pair (p, q) = (P_l, P_l+1): u = log q - log(p + eps), h = -q / (p + eps);
    d/dz_l+1 = q (u - <q, u>), d/dz_l = p (h - <p, h>))."""
    eps = join(eps_hi, eps_lo, ACC)
    b = tl.program_id(1)
    rows = r0 + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_end = r0 + n
    ms = tl.arange(0, BLOCK_M)
    in_rows = rows < row_end
    proxy = (ms < M)[None, :]  # padded proxies have logit -inf, probability 0
    lse_rows = lse + b * HW + rows
    z = _layer_logits(f0, f0_sb, f0_sc, f0_sr, C0, p0, b, rows, row_end, M, BLOCK_M, BLOCK_C, PRECISION, ACC)
    if FORWARD:
        lse_x = _row_lse(z)
        tl.store(lse_rows, lse_x, mask=in_rows)
    else:
        lse_x = tl.load(lse_rows, mask=in_rows, other=0.0).to(ACC)
    log_x = z - lse_x[:, None]
    total = tl.zeros([BLOCK_R], ACC)
    log_prev_eps = tl.zeros([BLOCK_R, BLOCK_M], ACC)  # log(P_l-1 + eps)
    qu_prev = tl.zeros([BLOCK_R], ACC)  # <q, u> of pair l-1
    coef = 0.0
    if GRAD:
        coef = tl.load(grad_loss).to(ACC) * join(norm_hi, norm_lo, ACC)
    for l in tl.static_range(L):
        # Layer l's gradient from pair l-1 first (layer l its target q: q (u - <q, u>)), so that
        # the next layer's logits are formed with only log P_l and this part alive.
        g = tl.zeros([BLOCK_R, BLOCK_M], ACC)
        if GRAD and l > 0:
            x = tl.exp(log_x)
            u = tl.where((x > 0) | (x != x), log_x - log_prev_eps, 0.0)
            g = x * (u - qu_prev[:, None])
        log_q = log_x
        qu = qu_prev
        if l + 1 < L:  # layer l is the input p of pair l, whose target q is layer l + 1
            z = _layer_logits(
                _pick(l + 1, f0, f1, f2, f3),
                _pick(l + 1, f0_sb, f1_sb, f2_sb, f3_sb),
                _pick(l + 1, f0_sc, f1_sc, f2_sc, f3_sc),
                _pick(l + 1, f0_sr, f1_sr, f2_sr, f3_sr),
                _pick(l + 1, C0, C1, C2, C3),
                _pick(l + 1, p0, p1, p2, p3),
                b,
                rows,
                row_end,
                M,
                BLOCK_M,
                BLOCK_C,
                PRECISION,
                ACC,
            )
            if FORWARD:
                lse_q = _row_lse(z)
                tl.store(lse_rows + (l + 1) * B * HW, lse_q, mask=in_rows)
            else:
                lse_q = tl.load(lse_rows + (l + 1) * B * HW, mask=in_rows, other=0.0).to(ACC)
            log_q = z - lse_q[:, None]
            q = tl.exp(log_q)
            x = tl.exp(log_x)
            log_prev_eps = tl.log(x + eps)  # of layer l, for pair l + 1's target
            qu = tl.sum(_kl_term(q, log_q, log_prev_eps), axis=1)  # 0 at padded proxies (q = 0)
            total += tl.where(in_rows, qu, 0.0)
            if GRAD:  # layer l the input p of pair l: p (h - <p, h>), p h = -p q / (p + eps)
                xq = tl.where(proxy, x * q / (x + eps), 0.0)
                g += x * tl.sum(xq, axis=1)[:, None] - xq
        if GRAD:
            out = grad + ((l * B + b) * n + (rows - r0)).to(tl.int64)[:, None] * M + ms[None, :]
            tl.store(out, coef * g, mask=in_rows[:, None] & proxy)
        qu_prev = qu
        log_x = log_q
    if FORWARD:
        tl.store(block_loss + b * tl.num_programs(0) + tl.program_id(0), tl.sum(total, axis=0))


_TILE = 1024
# Argument slots of the fused kernel and proxies it holds per row (more: the blocked path): the
# upstream L = 4, M = 64. 6 layers of 32 proxies, and 8 of 128, spilled registers on sm_80/sm_90.
_MAX_LAYERS = 4
_FUSED_MAX_M = 64
_FUSED_ROWS = 64  # pixel rows of a fused program: wgmma's 64 rows
_FUSED_CHANNELS = 16  # channels per chunk of the logits' product (32 spilled in backward)


def _blocks(M: int) -> tuple[int, int, bool]:
    """Rows and proxies of a row kernel's tile, and whether a row is wider than one tile. At least
    16 proxies: narrower tiles would only add compiles (the padding is masked)."""
    block_m = min(_TILE, max(16, triton.next_power_of_2(M)))
    return max(1, min(16, _TILE // block_m)), block_m, M > block_m


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def align_norm(shape, reduction: str) -> float:
    """Factor on the summed KL terms of logits (L, B, HW, M): 1 / ((L-1) * d), d = B*HW*M
    ("mean"), B ("batchmean") or 1 ("sum"), as csrc/common/cra_driver.h."""
    L, B, HW, M = shape
    return 1.0 / ((L - 1) * {"mean": B * HW * M, "batchmean": B, "sum": 1}[reduction])


def _rows_per_block(HW: int, block_rows: int) -> int:
    """At most block_rows, balanced over the blocks (as the C++ driver)."""
    blocks = -(-HW // min(block_rows, HW))
    return -(-HW // blocks)


def _block_logits(feats, proxies, r0, n):
    """(L, B, n, M) logits of pixel rows [r0, r0 + n), contiguous."""
    return torch.stack(
        [torch.bmm(f[:, :, r0 : r0 + n].transpose(1, 2), p.transpose(1, 2)) for f, p in zip(feats, proxies)]
    )


def _rows_backward(grad_loss, z, lse_block, eps, norm):
    """Logit gradients (L, B, n, M) of a block for the scalar grad_loss."""
    L, B, n, M = z.shape
    grad = torch.empty_like(z)
    block_r, block_m, wide = _blocks(M)
    kernel = _align_backward_wide_kernel if wide else _align_backward_kernel
    wrap_triton(kernel)[(triton.cdiv(B * n, block_r),)](
        grad_loss.reshape(1).to(z.dtype),
        z,
        lse_block,
        grad,
        B * n,
        M,
        *split(eps),
        *split(norm),
        L=L,
        BLOCK_R=block_r,
        BLOCK_M=block_m,
        ACC=_acc(z),
    )
    return grad


def _add_products(sums, a, b):
    """sums (B, M, C) += a @ b batched: in place in the accumulator dtype, or (half inputs) a
    product in their dtype added."""
    if a.dtype == sums.dtype:
        sums.baddbmm_(a, b)
    else:
        sums += torch.bmm(a, b).to(sums.dtype)


def _fused(feats, proxies) -> bool:
    """Whether the fused kernel takes these inputs (else the blocked path): tensor-core products
    (float32 in TF32, float16, bfloat16; its exact float32 and float64 forms spilled registers, and
    cuBLAS's exact products are as fast as FMA products get), at most _MAX_LAYERS layers and
    _FUSED_MAX_M proxies."""
    return (dot_precision(feats[0].dtype) == "tf32" or feats[0].dtype in (torch.float16, torch.bfloat16)) and (
        len(feats) <= _MAX_LAYERS and proxies[0].shape[1] <= _FUSED_MAX_M
    )


def _launch_fused(feats, proxies, lse, block_loss, grad, grad_loss, r0, n, eps, norm, forward):
    """The fused kernel over pixel rows [r0, r0 + n) of every image: forward (lse and block_loss
    written) or not (lse read), with the logit gradients into grad (L, B, n, M) when grad_loss is
    given. proxies contiguous."""
    L, (B, _, HW), M = len(feats), feats[0].shape, proxies[0].shape[1]
    slots = []
    for l in range(_MAX_LAYERS):  # unused slots repeat layer 0 (never read: L is a constexpr)
        f, p = (feats[l], proxies[l]) if l < L else (feats[0], proxies[0])
        slots += [f, *f.stride(), f.shape[1], p]
    block_m = max(16, triton.next_power_of_2(M))
    wrap_triton(_align_fused_kernel)[(triton.cdiv(n, _FUSED_ROWS), B)](
        *slots,
        lse,
        block_loss,
        lse if grad is None else grad,
        lse if grad_loss is None else grad_loss,
        B,
        HW,
        M,
        r0,
        n,
        *split(eps),
        *split(norm),
        L=L,
        BLOCK_R=_FUSED_ROWS,
        BLOCK_M=block_m,
        BLOCK_C=_FUSED_CHANNELS,
        FORWARD=forward,
        GRAD=grad is not None,
        PRECISION=dot_precision(feats[0].dtype),
        ACC=_acc(feats[0]),
        num_warps=4 if block_m == 16 else 8,  # 4 warps at 32 proxies spilled (a ceiling of 128)
    )


@triton_op("busseg_triton::cross_layer_alignment_loss", mutates_args=())
def cross_layer_alignment_loss(
    feats: list[torch.Tensor],
    proxies: list[torch.Tensor],
    reduction: str,
    eps: float,
    block_rows: int,
    grad_proxies: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    check_args(feats, proxies, reduction, eps, block_rows)
    L, (B, _, HW), M = len(feats), feats[0].shape, proxies[0].shape[1]
    dtype, device = feats[0].dtype, feats[0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norm = align_norm((L, B, HW, M), reduction)
    if not _fused(feats, proxies):
        return _blocked_forward(feats, proxies, eps, norm, block_rows, grad_proxies)
    proxies = [p.contiguous() for p in proxies]
    lse = torch.empty(L, B, HW, dtype=acc, device=device)
    # Without gradients one launch covers every row; with them, blocks of rows, each block's
    # proxy gradients formed right after the kernel has written its logit gradients.
    rows = _rows_per_block(HW, block_rows) if grad_proxies else HW
    total = torch.zeros((), dtype=acc, device=device)
    unit_grads = [torch.zeros(p.shape, dtype=acc, device=device) for p in proxies] if grad_proxies else []
    one = torch.ones((), dtype=dtype, device=device)
    for r0 in range(0, HW, rows):
        n = min(rows, HW - r0)
        block_loss = torch.empty(B, triton.cdiv(n, _FUSED_ROWS), dtype=acc, device=device)
        g = torch.empty(L, B, n, M, dtype=dtype, device=device) if grad_proxies else None
        _launch_fused(feats, proxies, lse, block_loss, g, one if grad_proxies else None, r0, n, eps, norm, True)
        total += block_loss.sum()
        for u, gl, f in zip(unit_grads, g if grad_proxies else (), feats):
            _add_products(u, gl.transpose(1, 2), f[:, :, r0 : r0 + n].transpose(1, 2))
    return (total * norm).to(dtype), lse, [u.to(dtype) for u in unit_grads]


@triton_op("busseg_triton::cross_layer_alignment_loss_backward", mutates_args=())
def cross_layer_alignment_loss_backward(
    grad_loss: torch.Tensor,
    feats: list[torch.Tensor],
    proxies: list[torch.Tensor],
    lse: torch.Tensor,
    reduction: str,
    eps: float,
    block_rows: int,
    need_grad_feats: bool,
    need_grad_proxies: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    check_backward_args(grad_loss, feats, proxies, lse, reduction, eps, block_rows)
    L, (B, _, HW), M = len(feats), feats[0].shape, proxies[0].shape[1]
    if not (need_grad_feats or need_grad_proxies):
        return [], []
    norm = align_norm((L, B, HW, M), reduction)
    if not _fused(feats, proxies):
        return _blocked_backward(
            grad_loss, feats, proxies, lse, eps, norm, block_rows, need_grad_feats, need_grad_proxies
        )
    dtype, device = feats[0].dtype, feats[0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    proxies = [p.contiguous() for p in proxies]
    lse = lse.to(acc).contiguous()
    grad_feats = [torch.empty_like(f) for f in feats] if need_grad_feats else []
    sums = [torch.zeros(p.shape, dtype=acc, device=device) for p in proxies] if need_grad_proxies else []
    rows = _rows_per_block(HW, block_rows)
    for r0 in range(0, HW, rows):
        n = min(rows, HW - r0)
        g = torch.empty(L, B, n, M, dtype=dtype, device=device)
        _launch_fused(feats, proxies, lse, lse, g, grad_loss.reshape(1), r0, n, eps, norm, False)
        for l in range(L):
            block = feats[l][:, :, r0 : r0 + n]
            if need_grad_proxies:
                _add_products(sums[l], g[l].transpose(1, 2), block.transpose(1, 2))
            if need_grad_feats:  # f_l[:, :, block] gradient = (g_l p_l)ᵀ
                grad_feats[l][:, :, r0 : r0 + n] = torch.bmm(proxies[l].transpose(1, 2), g[l].transpose(1, 2))
    return grad_feats, [s.to(p.dtype) for s, p in zip(sums, proxies)]


# ---- the blocked path (rows of more than _FUSED_MAX_M proxies, more than _MAX_LAYERS layers) -----


def _blocked_forward(feats, proxies, eps, norm, block_rows, grad_proxies):
    L, (B, _, HW), M = len(feats), feats[0].shape, proxies[0].shape[1]
    dtype, device = feats[0].dtype, feats[0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.empty(L, B, HW, dtype=acc, device=device)
    total = torch.zeros((), dtype=acc, device=device)
    unit_grads = [torch.zeros(p.shape, dtype=acc, device=device) for p in proxies] if grad_proxies else []
    one = torch.ones((), dtype=dtype, device=device)
    rows = _rows_per_block(HW, block_rows)
    block_r, block_m, wide = _blocks(M)
    forward_kernel = _align_forward_wide_kernel if wide else _align_forward_kernel
    for r0 in range(0, HW, rows):
        n = min(rows, HW - r0)
        z = _block_logits(feats, proxies, r0, n)
        lse_block = torch.empty(L, B * n, dtype=acc, device=device)
        row_loss = torch.empty(B * n, dtype=acc, device=device)
        # ptxas's register ceiling lifted: at 6 layers of 128 proxies it spilled to fit more blocks.
        wrap_triton(forward_kernel)[(triton.cdiv(B * n, block_r),)](
            z,
            lse_block,
            row_loss,
            B * n,
            M,
            *split(eps),
            L=L,
            BLOCK_R=block_r,
            BLOCK_M=block_m,
            ACC=_acc(z),
            maxnreg=255,
        )
        lse[:, :, r0 : r0 + n] = lse_block.view(L, B, n)
        total += row_loss.sum()
        if grad_proxies:  # proxy gradients for grad_loss = 1 from the block at hand
            g = _rows_backward(one, z, lse_block, eps, norm)
            for u, gl, f in zip(unit_grads, g, feats):
                _add_products(u, gl.transpose(1, 2), f[:, :, r0 : r0 + n].transpose(1, 2))
    return (total * norm).to(dtype), lse, [u.to(dtype) for u in unit_grads]


def _blocked_backward(grad_loss, feats, proxies, lse, eps, norm, block_rows, need_grad_feats, need_grad_proxies):
    L, (B, _, HW) = len(feats), feats[0].shape
    grad_feats = [torch.empty_like(f) for f in feats] if need_grad_feats else []
    acc = lse.dtype
    sums = [torch.zeros(p.shape, dtype=acc, device=p.device) for p in proxies] if need_grad_proxies else []
    rows = _rows_per_block(HW, block_rows)
    for r0 in range(0, HW, rows):
        n = min(rows, HW - r0)
        z = _block_logits(feats, proxies, r0, n)
        g = _rows_backward(grad_loss, z, lse[:, :, r0 : r0 + n].reshape(L, B * n).contiguous(), eps, norm)
        for l in range(L):
            block = feats[l][:, :, r0 : r0 + n]
            if need_grad_proxies:
                _add_products(sums[l], g[l].transpose(1, 2), block.transpose(1, 2))
            if need_grad_feats:  # f_l[:, :, block] gradient = (g_l p_l)ᵀ
                grad_feats[l][:, :, r0 : r0 + n] = torch.bmm(proxies[l].transpose(1, 2), g[l].transpose(1, 2))
    return grad_feats, [s.to(p.dtype) for s, p in zip(sums, proxies)]
