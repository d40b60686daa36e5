"""CRA alignment loss (SPEC §2.2) in Triton, after the BLAS logits. A program owns a block of
pixel rows with whole proxy rows (M padded to a power of two) in registers; the layers are
unrolled (L is a compile-time constant). Forward: log-sum-exp per layer and the KL terms of the
adjacent pairs; backward: a sliding window over layers l-1, l, l+1 writes each logit gradient
once. Greedy sampling has no Triton version (sequential, and each step reads the feature row of
a pixel chosen at run time: an indirect load)."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..cra import align_norm, register_autograd


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
def _align_forward_kernel(
    logits, lse, row_loss, R, M, eps, L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr
):
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
def _align_backward_kernel(
    grad_loss,
    logits,
    lse,
    grad,
    R,
    M,
    eps,
    norm,
    L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
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


def _blocks(M: int) -> tuple[int, int]:
    block_m = triton.next_power_of_2(M)
    return max(1, min(16, 4096 // block_m)), block_m


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@triton_op("busseg::cra_align_forward_triton", mutates_args=())
def cra_align_forward_triton(logits: torch.Tensor, reduction: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    L, B, HW, M = logits.shape
    z = logits.contiguous()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lse = torch.empty(L, B, HW, dtype=acc, device=logits.device)
    row_loss = torch.empty(B * HW, dtype=acc, device=logits.device)
    block_r, block_m = _blocks(M)
    wrap_triton(_align_forward_kernel)[(triton.cdiv(B * HW, block_r),)](
        z, lse, row_loss, B * HW, M, eps, L=L, BLOCK_R=block_r, BLOCK_M=block_m, ACC=_acc(logits)
    )
    return (row_loss.sum() * align_norm(logits.shape, reduction)).to(logits.dtype), lse


@triton_op("busseg::cra_align_backward_triton", mutates_args=())
def cra_align_backward_triton(
    grad_loss: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, reduction: str, eps: float
) -> torch.Tensor:
    L, B, HW, M = logits.shape
    z = logits.contiguous()
    grad = torch.empty_like(z)
    block_r, block_m = _blocks(M)
    wrap_triton(_align_backward_kernel)[(triton.cdiv(B * HW, block_r),)](
        grad_loss.reshape(1).to(logits.dtype),
        z,
        lse.contiguous(),
        grad,
        B * HW,
        M,
        eps,
        align_norm(logits.shape, reduction),
        L=L,
        BLOCK_R=block_r,
        BLOCK_M=block_m,
        ACC=_acc(logits),
    )
    return grad


register_autograd("busseg::cra_align_forward_triton", cra_align_backward_triton)
