"""busseg_triton::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md) in Triton: a program per
block of anchors streams blocks of negatives through tl.dot with an online log-sum-exp (forward
keeps the per-anchor LSE, and when asked the anchor-gradient programs' Σ π n̂ with coefficient 1);
the backward recomputes the tiles in a program per block of
anchors (anchor gradient) or of negatives (negative gradient) and block of at most _MAX_BLOCK_D
feature columns (no atomics; for larger D each tile is recomputed once per column block). A tile's
dot products run over chunks of _BLOCK_K features, accumulated in float32 for half inputs: whole
feature rows as tl.dot operands spilled registers from D = 256 on sm_80/sm_90, and half
accumulators did not compile. The gradient programs lift ptxas's register ceiling (maxnreg): by
default it spilled a few bytes to fit two blocks per SM. The cosine normalisation, the positive
term and the class weights are O((N + N⁻)·D) torch ops around the kernels."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _validate
from ._float_args import join, split


@triton.jit
def _sim_tile(a, n, rows, cols, N, M, D, inv_tau, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """(rows, cols) logits <â_i, n̂_j>/τ, the dot products summed over chunks of BLOCK_K features
    (whole feature rows as tl.dot operands spilled registers from D = 256 on sm_80/sm_90)."""
    ks = tl.arange(0, BLOCK_K)
    s = tl.zeros([rows.shape[0], cols.shape[0]], ACC)
    for d0 in range(0, D, BLOCK_K):
        fs = d0 + ks
        a_tile = tl.load(a + rows[:, None] * D + fs[None, :], mask=(rows[:, None] < N) & (fs[None, :] < D), other=0.0)
        n_tile = tl.load(n + cols[:, None] * D + fs[None, :], mask=(cols[:, None] < M) & (fs[None, :] < D), other=0.0)
        s = tl.dot(a_tile, tl.trans(n_tile), s, input_precision="ieee", out_dtype=ACC)
    return s * inv_tau


@triton.jit
def _anchor_rows(ya_ptr, lse, coef, rows, N, ACC: tl.constexpr):
    """Labels, LSE and gradient coefficients of a block of anchors."""
    ya = tl.load(ya_ptr + rows, mask=rows < N, other=0)
    l = tl.load(lse + rows, mask=rows < N, other=0.0).to(ACC)
    c = tl.load(coef + rows, mask=rows < N, other=0.0).to(ACC)
    return ya, l, c


@triton.jit
def _contrastive_forward_kernel(
    a,
    n,
    ya_ptr,
    yn,
    pos,
    lse,
    N,
    M,
    D,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ya = tl.load(ya_ptr + rows, mask=rows < N, other=0)
    m = tl.load(pos + rows, mask=rows < N, other=0.0).to(ACC)  # the positive term starts the sum
    s = tl.full([BLOCK_N], 1.0, ACC)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        labels = tl.load(yn + cols, mask=cols < M, other=0)
        counted = (cols[None, :] < M) & (labels[None, :] != ya[:, None])
        logits = tl.where(counted, _sim_tile(a, n, rows, cols, N, M, D, inv_tau, BLOCK_K, ACC), float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
    tl.store(lse + rows, m + tl.log(s), mask=rows < N)


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
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """da[rows, ds] += Σ_j g_ij n̂_j[ds]: a program per block of anchors and of feature columns."""
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ya, l, c = _anchor_rows(ya_ptr, lse, coef, rows, N, ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        labels = tl.load(yn + cols, mask=cols < M, other=0)
        counted = (cols[None, :] < M) & (labels[None, :] != ya[:, None]) & (c[:, None] != 0)
        logits = _sim_tile(a, n, rows, cols, N, M, D, inv_tau, BLOCK_K, ACC)
        g = tl.where(counted, c[:, None] * tl.exp(logits - l[:, None]), 0.0)
        n_cols = tl.load(n + cols[:, None] * D + ds[None, :], mask=(cols[:, None] < M) & (ds[None, :] < D), other=0.0)
        acc = tl.dot(g.to(n_cols.dtype), n_cols, acc, input_precision="ieee", out_dtype=ACC)
    tile_mask = (rows[:, None] < N) & (ds[None, :] < D)
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
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """dn[cols, ds] = Σ_i g_ij â_i[ds]: a program per block of negatives and of feature columns."""
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    labels = tl.load(yn + cols, mask=cols < M, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        ya, l, c = _anchor_rows(ya_ptr, lse, coef, rows, N, ACC)
        counted = (rows[:, None] < N) & (cols[None, :] < M) & (labels[None, :] != ya[:, None]) & (c[:, None] != 0)
        logits = _sim_tile(a, n, rows, cols, N, M, D, inv_tau, BLOCK_K, ACC)
        g = tl.where(counted, c[:, None] * tl.exp(logits - l[:, None]), 0.0)
        a_cols = tl.load(a + rows[:, None] * D + ds[None, :], mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0)
        acc = tl.dot(tl.trans(g.to(a_cols.dtype)), a_cols, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(dn + cols[:, None] * D + ds[None, :], acc, mask=(cols[:, None] < M) & (ds[None, :] < D))


_BLOCK_N = _BLOCK_M = 32
_BLOCK_K = 16  # features per chunk of a logit tile's dot products
_MAX_BLOCK_D = 128  # feature columns of a gradient program; more would spill (8 warps)
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def _prepare(anchors, anchor_labels, negatives, positives, has_positive, temperature):
    """Normalised anchors/negatives, the positive logits pos_i and the anchor weights w_i
    (the same quantities as csrc/common/contrastive_driver.h)."""
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


def _blocks(t: torch.Tensor) -> dict:
    """Constexprs of every contrastive kernel; float32 accumulation for half inputs."""
    return dict(BLOCK_N=_BLOCK_N, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, ACC=_acc(t))


def _grad_blocks(t: torch.Tensor) -> tuple[int, dict]:
    """Feature-column blocks of the gradient kernels and their constexprs (with launch options)."""
    block_d = min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(t.shape[1])))
    return triton.cdiv(t.shape[1], block_d), dict(_blocks(t), BLOCK_D=block_d, num_warps=8, maxnreg=255)


def _add_anchor_grad(da, a, n, anchor_labels, negative_labels, lse, coef, temperature):
    """da (N, D, contiguous) += Σ_j coef_i π_ij n̂_j over each anchor's negatives: the anchors'
    gradient in backward, weighted_negatives (coef 1) in forward."""
    N, D = a.shape
    M = n.shape[0]
    if N == 0 or M == 0:
        return
    column_blocks, meta = _grad_blocks(a)
    wrap_triton(_contrastive_anchor_grad_kernel)[(triton.cdiv(N, _BLOCK_N), column_blocks)](
        a,
        n,
        anchor_labels.contiguous(),
        negative_labels.contiguous(),
        lse.contiguous(),
        coef.contiguous(),
        da,
        N,
        M,
        D,
        *split(1.0 / temperature),
        **meta,
    )


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _check(op, anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature):
    """The checks of csrc/memory_contrastive_loss/checks.h, before any launch."""
    torch._check_value(
        anchors.dim() == 2 and negatives.dim() == 2 and positives.dim() == 2,
        lambda: f"{op}: anchors (N, D), negatives (N-, D) and positives (K, D) must be 2-D",
    )
    D = anchors.shape[1]
    torch._check_value(
        negatives.shape[1] == D and positives.shape[1] == D and positives.shape[0] >= 1,
        lambda: f"{op}: anchors, negatives and positives must share D, with K >= 1 positives",
    )
    torch._check_value(
        tuple(anchor_labels.shape) == (anchors.shape[0],) and tuple(negative_labels.shape) == (negatives.shape[0],),
        lambda: f"{op}: anchor_labels must be (N,) and negative_labels (N-,)",
    )
    torch._check_value(tuple(has_positive.shape) == (positives.shape[0],), lambda: f"{op}: has_positive must be (K,)")
    torch._check_type(
        anchor_labels.dtype == torch.int64
        and negative_labels.dtype == torch.int64
        and has_positive.dtype == torch.bool,
        lambda: f"{op}: labels must be int64 and has_positive bool",
    )
    torch._check_type(
        anchors.is_floating_point() and negatives.dtype == anchors.dtype and positives.dtype == anchors.dtype,
        lambda: f"{op}: anchors, negatives and positives must share a float dtype",
    )
    torch._check_value(temperature > 0, lambda: f"{op}: temperature must be > 0, got {temperature}")
    _validate.one_device(
        op,
        anchors=anchors,
        anchor_labels=anchor_labels,
        negatives=negatives,
        negative_labels=negative_labels,
        positives=positives,
        has_positive=has_positive,
    )


@triton_op("busseg_triton::memory_contrastive_loss", mutates_args=())
def memory_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    positives: torch.Tensor,
    has_positive: torch.Tensor,
    temperature: float,
    save_weighted_negatives: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature)
    _check("memory_contrastive_loss", *args)
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
            *split(1.0 / temperature),
            **_blocks(a),
        )
    loss = (weight * torch.where(weight > 0, lse - pos, 0.0)).sum()
    if not save_weighted_negatives:
        return loss, lse, anchors.new_empty(0)
    # Σ_j π_ij n̂_j: the anchor-gradient programs with coefficient 1 for the anchors with loss.
    # Here they run in forward instead of backward, a second pass over the tiles (the C++ backends
    # accumulate it in the LSE's pass).
    weighted_negatives = torch.zeros_like(a)
    ones = (weight > 0).to(a.dtype)
    _add_anchor_grad(weighted_negatives, a, n, anchor_labels, negative_labels, lse, ones, temperature)
    return loss, lse, weighted_negatives


@triton_op("busseg_triton::memory_contrastive_loss_backward", mutates_args=())
def memory_contrastive_loss_backward(
    grad_loss: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    positives: torch.Tensor,
    has_positive: torch.Tensor,
    lse: torch.Tensor,
    weighted_negatives: torch.Tensor,
    temperature: float,
    need_grad_negatives: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "memory_contrastive_loss_backward"
    _check(op, anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature)
    torch._check_value(tuple(lse.shape) == (anchors.shape[0],), lambda: f"{op}: lse must be (N,)")
    torch._check_value(grad_loss.numel() == 1, lambda: f"{op}: grad_loss must be a scalar")
    torch._check_type(
        lse.is_floating_point() and grad_loss.is_floating_point() and weighted_negatives.is_floating_point(),
        lambda: f"{op}: lse, weighted_negatives and grad_loss must be floating",
    )
    saved = tuple(weighted_negatives.shape) != (0,)
    torch._check_value(
        not saved or tuple(weighted_negatives.shape) == tuple(anchors.shape),
        lambda: f"{op}: weighted_negatives must be (N, D) or (0,)",
    )
    _validate.one_device(op, anchors=anchors, lse=lse, grad_loss=grad_loss, weighted_negatives=weighted_negatives)
    a, n, p, lab, pos, weight = _prepare(anchors, anchor_labels, negatives, positives, has_positive, temperature)
    N, D = a.shape
    M = n.shape[0]
    coef = (grad_loss.to(a.dtype) * weight / temperature).contiguous()
    pi_pos = torch.where(weight > 0, (pos - lse).exp(), 1.0)
    da = ((coef * (pi_pos - 1))[:, None] * p[lab]).contiguous()
    if saved:  # forward's Σ_j π_ij n̂_j: the negatives' part without a pass over the tiles
        da += coef[:, None] * weighted_negatives
    else:
        _add_anchor_grad(da, a, n, anchor_labels, negative_labels, lse, coef, temperature)
    grad_negatives = anchors.new_empty(0)
    if need_grad_negatives:
        dn = torch.zeros_like(n)
        if N > 0 and M > 0:
            column_blocks, meta = _grad_blocks(a)
            wrap_triton(_contrastive_negative_grad_kernel)[(triton.cdiv(M, _BLOCK_M), column_blocks)](
                a,
                n,
                anchor_labels.contiguous(),
                negative_labels.contiguous(),
                lse.contiguous(),
                coef,
                dn,
                N,
                M,
                D,
                *split(1.0 / temperature),
                **meta,
            )
        grad_negatives = _normalize_backward(negatives, n, dn)
    return _normalize_backward(anchors, a, da), grad_negatives


# ---- launch space: what the GPU compile check (tools/gpu_compile_check.py) compiles ------------

#: Problem axes that decide what the launchers above launch. First value: the base problem; second:
#: the smallest blocks. Features of 256 give gradient column blocks of 128 (base), then 16 (D = 1,
#: specialised), 32, 64, 128 with D not a multiple of 16, and three blocks.
LAUNCH_AXES = {
    "dtype": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "dim": (256, 1, 20, 40, 100, 300),
}
#: The largest blocks with D not a multiple of 16, compiled in every dtype like the base.
LAUNCH_CORNERS = ({"dim": 300},)


def launch_stand_in(dtype, dim):
    """Forward and backward launches on stand-in inputs with features of `dim`."""
    anchors, negatives, positives = (torch.ones(n, dim, dtype=dtype) for n in (37, 41, 2))
    labels = torch.zeros(37, dtype=torch.int64), torch.ones(41, dtype=torch.int64)
    has_positive = torch.ones(2, dtype=torch.bool)
    args = (anchors, labels[0], negatives, labels[1], positives, has_positive, 0.5)
    _, lse, _ = memory_contrastive_loss(*args, False)
    memory_contrastive_loss_backward(torch.ones((), dtype=dtype), *args[:6], lse, anchors.new_empty(0), 0.5, True)
