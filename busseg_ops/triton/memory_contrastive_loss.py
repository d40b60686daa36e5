"""busseg_triton::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md) in Triton, flash-attention
style: Σ_j π_ij n̂_j is attention with the keys as values, so the (N, N⁻) similarities never exist
(memory O((N + N⁻)·D)). How the kernels stream the negatives, skip same-class blocks and split
the work: docs/kernels.md."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops.memory_contrastive_loss import check_args, check_backward_args
from ._float_args import join, split
from ._precision import dot_precision


@triton.jit
def _unskipped(lo, hi, class_lo, class_hi, one_class, BLOCK: tl.constexpr):
    """The blocks of [lo, hi) (lo a multiple of BLOCK) that do not lie inside the class's run
    [class_lo, class_hi): the loop covers [lo, first_end) and [second_start, hi)."""
    skip_lo = tl.cdiv(class_lo, BLOCK) * BLOCK
    skip_hi = tl.where(class_hi >= hi, hi, class_hi // BLOCK * BLOCK)
    skips = one_class & (skip_lo < skip_hi)
    first_end = tl.where(skips, tl.minimum(tl.maximum(skip_lo, lo), hi), hi)
    second_start = tl.where(skips, tl.minimum(tl.maximum(skip_hi, first_end), hi), hi)
    return first_end, second_start


@triton.jit
def _rows(x, rows, stride, BLOCK_K: tl.constexpr):
    """Features [0, BLOCK_K) of the given rows of x (row-major, zero-padded to `stride` columns and
    to whole blocks of rows: no load needs a mask)."""
    return tl.load(x + rows.to(tl.int64)[:, None] * stride + tl.arange(0, BLOCK_K)[None, :])


@triton.jit
def _similarity(
    x,
    y,
    x_rows,
    y_rows,
    x_tile,
    y_tile,
    K_SUM,
    stride,
    RESIDENT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """(x_rows, y_rows) tile of dot products <x_i, y_j> of unit rows. RESIDENT: one product of the
    tiles the caller holds (whole padded rows, BLOCK_K = stride); else over chunks of BLOCK_K
    features up to K_SUM, loaded here."""
    if RESIDENT:
        s = tl.dot(x_tile, tl.trans(y_tile), input_precision=PRECISION, out_dtype=ACC)
    else:
        s = tl.zeros([x_rows.shape[0], y_rows.shape[0]], ACC)
        for d0 in range(0, K_SUM, BLOCK_K):
            xt = _rows(x + d0, x_rows, stride, BLOCK_K)
            yt = _rows(y + d0, y_rows, stride, BLOCK_K)
            s = tl.dot(xt, tl.trans(yt), s, input_precision=PRECISION, out_dtype=ACC)
    return s


@triton.jit
def _fold_negatives(
    a,
    n,
    yn_ptr,
    ya,
    rows,
    a_tile,
    ds,
    m,
    l,
    acc,
    j_lo,
    j_hi,
    M,
    K_SUM,
    stride,
    inv_tau,
    BLOCK_STREAM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr,
    WITH_WN: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Folds the negative blocks of [j_lo, j_hi) into the running max m, sum l and Σ e^{.-m} n̂
    (acc, feature columns ds) of a block of anchors (a_tile: their rows when RESIDENT)."""
    for j0 in range(j_lo, j_hi, BLOCK_STREAM):
        cols = j0 + tl.arange(0, BLOCK_STREAM)
        yn = tl.load(yn_ptr + cols, mask=cols < M, other=0)
        counted = (cols < M)[None, :] & (yn[None, :] != ya[:, None])
        n_tile = 0.0
        if RESIDENT:  # one load serves both products
            n_tile = _rows(n, cols, stride, BLOCK_K)
        s = _similarity(a, n, rows, cols, a_tile, n_tile, K_SUM, stride, RESIDENT, BLOCK_K, PRECISION, ACC)
        logits = tl.where(counted, s * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if WITH_WN:
            if RESIDENT and BLOCK_D == BLOCK_K:
                nd = n_tile
            else:
                nd = tl.load(n + cols.to(tl.int64)[:, None] * stride + ds[None, :])
            acc = tl.dot(p.to(nd.dtype), nd, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        m = m_new
    return m, l, acc


@triton.jit
def _contrastive_forward_kernel(
    a,
    n,
    ya_ptr,
    yn_ptr,
    pos_ptr,
    neg_class_lo,
    neg_class_hi,
    m_out,
    l_out,
    acc_out,
    N,
    M,
    K_SUM,
    stride,
    K,
    cols_per_split,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_STREAM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr,
    WITH_WN: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """A program per (block of sorted anchors, block of feature columns of Σ π n̂, split of the
    negatives): the partial running max m, sum l (the positive term in split 0) and Σ_j e^{s_ij -
    m_i} n̂_j over the split's negatives of other classes."""
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    split = tl.program_id(2)
    row0 = tl.program_id(0) * BLOCK_ROWS
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ya = tl.load(ya_ptr + rows, mask=rows < N, other=K)
    # The positive term is the first reference point of every split's running max (finite, so
    # that a split without a counted negative rescales by e^0), and counts in split 0's sum.
    m = tl.load(pos_ptr + rows, mask=rows < N, other=0.0).to(ACC)
    l = tl.where(split == 0, 1.0, 0.0) + tl.zeros([BLOCK_ROWS], ACC)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], ACC)
    a_tile = 0.0
    if RESIDENT:  # the block's rows stay in the program for every negative block
        a_tile = _rows(a, rows, stride, BLOCK_K)
    # Sorted keys: the block's first and last key bound it; ignored anchors (key K) come last.
    first = tl.load(ya_ptr + row0)
    last = tl.load(ya_ptr + tl.minimum(row0 + BLOCK_ROWS, N) - 1)
    one_class = (first == last) & (first < K)
    c = tl.where(one_class, first, 0)
    lo = split * cols_per_split
    hi = tl.where(first < K, tl.minimum(lo + cols_per_split, M), lo)
    first_end, second_start = _unskipped(
        lo, hi, tl.load(neg_class_lo + c), tl.load(neg_class_hi + c), one_class, BLOCK_STREAM
    )
    m, l, acc = _fold_negatives(
        a, n, yn_ptr, ya, rows, a_tile, ds, m, l, acc, lo, first_end, M, K_SUM, stride, inv_tau,
        BLOCK_STREAM, BLOCK_K, BLOCK_D, RESIDENT, WITH_WN, PRECISION, ACC,
    )  # fmt: skip
    m, l, acc = _fold_negatives(
        a, n, yn_ptr, ya, rows, a_tile, ds, m, l, acc, second_start, hi, M, K_SUM, stride, inv_tau,
        BLOCK_STREAM, BLOCK_K, BLOCK_D, RESIDENT, WITH_WN, PRECISION, ACC,
    )  # fmt: skip
    out_rows = split * N + rows
    if tl.program_id(1) == 0:  # every column block has them
        tl.store(m_out + out_rows, m, mask=rows < N)
        tl.store(l_out + out_rows, l, mask=rows < N)
    if WITH_WN:
        tl.store(acc_out + out_rows.to(tl.int64)[:, None] * stride + ds[None, :], acc, mask=(rows < N)[:, None])


@triton.jit
def _add_anchor_block(
    a,
    n,
    ya_ptr,
    lse_ptr,
    coef_ptr,
    yn,
    cols,
    n_tile,
    ds,
    i0,
    acc,
    N,
    M,
    K_SUM,
    stride,
    inv_tau,
    BLOCK_STREAM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """acc (negatives × feature columns) += gᵀ â[:, ds] for the anchors [i0, i0 + BLOCK_STREAM)
    (n_tile: the negatives' rows when RESIDENT)."""
    rows = i0 + tl.arange(0, BLOCK_STREAM)
    ya = tl.load(ya_ptr + rows, mask=rows < N, other=0)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0).to(ACC)
    coef = tl.load(coef_ptr + rows, mask=rows < N, other=0.0).to(ACC)
    counted = (rows < N)[None, :] & (cols < M)[:, None] & (yn[:, None] != ya[None, :]) & (coef != 0)[None, :]
    a_tile = 0.0
    if RESIDENT:  # one load serves both products
        a_tile = _rows(a, rows, stride, BLOCK_K)
    s = _similarity(n, a, cols, rows, n_tile, a_tile, K_SUM, stride, RESIDENT, BLOCK_K, PRECISION, ACC)
    g = tl.where(counted, coef[None, :] * tl.exp(s * inv_tau - lse[None, :]), 0.0)
    if RESIDENT and BLOCK_D == BLOCK_K:
        ad = a_tile
    else:
        ad = tl.load(a + rows.to(tl.int64)[:, None] * stride + ds[None, :])
    return tl.dot(g.to(ad.dtype), ad, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _contrastive_negative_grad_kernel(
    a,
    n,
    ya_ptr,
    yn_ptr,
    lse_ptr,
    coef_ptr,
    anchor_class_lo,
    anchor_class_hi,
    dn_out,
    N,
    M,
    K_SUM,
    stride,
    K,
    rows_per_split,
    inv_tau_hi,
    inv_tau_lo,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_STREAM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """dn[split, cols, ds] = Σ_i g_ij â_i[ds] over the split's anchors, g_ij = coef_i e^{s_ij -
    lse_i} for the pairs that count: a program per (block of sorted negatives, block of feature
    columns, split of the anchors)."""
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    split = tl.program_id(2)
    col0 = tl.program_id(0) * BLOCK_ROWS
    cols = col0 + tl.arange(0, BLOCK_ROWS)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    yn = tl.load(yn_ptr + cols, mask=cols < M, other=0)
    n_tile = 0.0
    if RESIDENT:  # the block's rows stay in the program for every anchor block
        n_tile = _rows(n, cols, stride, BLOCK_K)
    first = tl.load(yn_ptr + col0)
    last = tl.load(yn_ptr + tl.minimum(col0 + BLOCK_ROWS, M) - 1)
    one_class = (first == last) & (first >= 0) & (first < K)
    c = tl.where(one_class, first, 0)
    # The valid anchors are the sorted ones before the first ignored one (key K).
    valid_rows = tl.load(anchor_class_lo + K)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, valid_rows)
    first_end, second_start = _unskipped(
        lo, hi, tl.load(anchor_class_lo + c), tl.load(anchor_class_hi + c), one_class, BLOCK_STREAM
    )
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], ACC)
    for i0 in range(lo, first_end, BLOCK_STREAM):
        acc = _add_anchor_block(
            a, n, ya_ptr, lse_ptr, coef_ptr, yn, cols, n_tile, ds, i0, acc, N, M, K_SUM, stride, inv_tau,
            BLOCK_STREAM, BLOCK_K, BLOCK_D, RESIDENT, PRECISION, ACC,
        )  # fmt: skip
    for i0 in range(second_start, hi, BLOCK_STREAM):
        acc = _add_anchor_block(
            a, n, ya_ptr, lse_ptr, coef_ptr, yn, cols, n_tile, ds, i0, acc, N, M, K_SUM, stride, inv_tau,
            BLOCK_STREAM, BLOCK_K, BLOCK_D, RESIDENT, PRECISION, ACC,
        )  # fmt: skip
    tl.store(dn_out + (split * M + cols).to(tl.int64)[:, None] * stride + ds[None, :], acc, mask=(cols < M)[:, None])


_BLOCK = 64  # rows of a program's own operand (wgmma takes 64); the operands are padded to it
# Tensor-core products on features of at most _MAX_RESIDENT (padded to a power of two): the
# program's rows stay resident for the similarities, each streamed block (at most _STREAM_BYTES
# and _MAX_STREAM rows) is loaded once for them, and the Σ π n̂ or gradient accumulator covers at
# most _RESIDENT_COLUMNS[bytes per element] feature columns (one block: the streamed block serves
# its product too; more: a program per column block, each forming the similarities).
_MAX_RESIDENT = 256
_STREAM_BYTES = 16 << 10
_MAX_STREAM = 32  # rows: a 64 x 64 similarity tile spilled in the negatives' gradient on sm_80
_RESIDENT_COLUMNS = {2: 256, 4: 128}  # float32: 256 columns spilled on sm_90 (tf32 operands)
# Otherwise the products run over chunks: per kind, rows of each streamed block, features per
# chunk of a similarity, the most feature columns of a program's accumulator, warps. The FMA
# products (exact float32; float64 on DMMA) hold their operands in registers: smaller blocks and
# chunks, and ptxas's register ceiling lifted (by default it spilled to fit two blocks per SM).
_CHUNKED_TILES = dict(block_stream=64, block_k=32, max_block_d=128, num_warps=8)
_FMA_TILES = dict(block_stream=32, block_k=8, max_block_d=64, num_warps=8, maxnreg=255)
_PROGRAMS_PER_SM = 2  # split the streamed side until the grid has this many programs per SM
_INTERPRETER_SMS = 2  # "SMs" under the interpreter: small test problems split too
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Layout(NamedTuple):
    """How the operands are tiled: features summed per similarity (k_sum, a multiple of BLOCK_K),
    the padded row length (stride, a multiple of block_d) and the constexprs of every kernel."""

    k_sum: int
    stride: int
    block_d: int
    meta: dict


def _layout(dtype: torch.dtype, D: int) -> _Layout:
    precision = dot_precision(dtype)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    fma = dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee")
    width = max(16, triton.next_power_of_2(D))
    if not fma and width <= _MAX_RESIDENT:
        element = torch.finfo(dtype).bits // 8
        meta = dict(
            BLOCK_ROWS=_BLOCK,
            BLOCK_STREAM=min(_MAX_STREAM, _STREAM_BYTES // (width * element)),  # powers of two
            BLOCK_K=width,
            RESIDENT=True,
            PRECISION=precision,
            ACC=acc,
            num_warps=8,
            num_stages=2,
        )
        return _Layout(width, width, min(width, _RESIDENT_COLUMNS[element]), meta)
    tiles = dict(_FMA_TILES if fma else _CHUNKED_TILES)
    block_stream, block_k, max_block_d = tiles.pop("block_stream"), tiles.pop("block_k"), tiles.pop("max_block_d")
    block_d = min(max_block_d, max(block_k, triton.next_power_of_2(D)))
    meta = dict(
        BLOCK_ROWS=_BLOCK, BLOCK_STREAM=block_stream, BLOCK_K=block_k, RESIDENT=False, PRECISION=precision, ACC=acc
    )
    return _Layout(-(-D // block_k) * block_k, -(-D // block_d) * block_d, block_d, dict(meta, **tiles))


class _Sorted(NamedTuple):
    """The operands of the kernels, sorted by class, and the per-anchor terms in original order."""

    a: torch.Tensor  # (N, D) unit anchors, float32 (float64), original order
    n: torch.Tensor  # (N⁻, D) unit negatives, likewise
    p_of_anchor: torch.Tensor  # (N, D) the unit positive of each anchor's class
    pos: torch.Tensor  # (N,) <â_i, p̂_{y_i}> / τ
    weight: torch.Tensor  # (N,) w_i (0: ignored anchor)
    perm_a: torch.Tensor  # sorted position -> anchor
    perm_n: torch.Tensor  # sorted position -> negative
    a_sorted: torch.Tensor  # unit anchors in the operand dtype, sorted, zero-padded (_padded)
    n_sorted: torch.Tensor  # unit negatives likewise
    key_sorted: torch.Tensor  # (N,) the class of each sorted anchor, K for ignored ones
    yn_sorted: torch.Tensor  # (N⁻,)
    layout: _Layout


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(_acc_dtype(x.dtype))
    return x / x.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)


def _padded(x: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype` with zero rows up to a whole block and zero columns up to `stride`: the
    kernels' loads need no mask (and the zeros add nothing to a dot product)."""
    out = x.new_zeros(-(-x.shape[0] // _BLOCK) * _BLOCK, stride, dtype=dtype)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _prepare(anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature) -> _Sorted:
    """Unit rows, the positive logits pos_i and the anchor weights w_i (the quantities of
    csrc/common/contrastive_driver.h), and the class-sorted operands."""
    K = positives.shape[0]
    a, n, p = _unit(anchors), _unit(negatives), _unit(positives)
    lab = anchor_labels.clamp(0, K - 1)
    valid = (anchor_labels >= 0) & (anchor_labels < K) & has_positive[lab]
    p_of_anchor = p[lab]
    pos = (a * p_of_anchor).sum(1) / temperature
    counts = torch.zeros(K, dtype=a.dtype, device=a.device).index_add_(0, lab, valid.to(a.dtype))
    classes = (counts > 0).sum().clamp_min(1).to(a.dtype)
    weight = torch.where(valid, 1.0 / (counts[lab].clamp_min(1) * classes), 0.0)
    key = torch.where(valid, anchor_labels, K)
    perm_a = torch.argsort(key)
    perm_n = torch.argsort(negative_labels)
    layout = _layout(anchors.dtype, anchors.shape[1])
    return _Sorted(
        a=a,
        n=n,
        p_of_anchor=p_of_anchor,
        pos=pos,
        weight=weight,
        perm_a=perm_a,
        perm_n=perm_n,
        a_sorted=_padded(a[perm_a], layout.stride, anchors.dtype),
        n_sorted=_padded(n[perm_n], layout.stride, anchors.dtype),
        key_sorted=key[perm_a].contiguous(),
        yn_sorted=negative_labels[perm_n].contiguous(),
        layout=layout,
    )


def _class_runs(sorted_labels: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each class c in [0, K] sits in the sorted labels: [lo[c], hi[c]) (on the device)."""
    classes = torch.arange(K + 1, device=sorted_labels.device, dtype=sorted_labels.dtype)
    return (
        torch.searchsorted(sorted_labels, classes).contiguous(),
        torch.searchsorted(sorted_labels, classes, right=True).contiguous(),
    )


def _splits(programs: int, streamed: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, streamed rows per split): the `streamed` rows, in blocks of `block`, split into
    ranges so that the grid has about _PROGRAMS_PER_SM programs per SM (one range when the other
    axes fill it)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _INTERPRETER_SMS
    blocks = triton.cdiv(streamed, block)
    wanted = max(1, min(blocks, -(-_PROGRAMS_PER_SM * sms // programs)))
    per_split = -(-blocks // wanted)
    return -(-blocks // per_split), per_split * block


def _softmax_sums(s: _Sorted, K: int, temperature: float, with_wn: bool):
    """(lse (N,), Σ_j π_ij n̂_j (N, D) or None) in original anchor order, in the accumulator dtype:
    the forward kernel's partial sums merged over the splits. Rows of ignored anchors: lse = pos,
    Σ π n̂ = 0."""
    (N, D), M = s.a.shape, s.n.shape[0]
    layout = s.layout
    column_blocks = layout.stride // layout.block_d if with_wn else 1
    row_blocks = triton.cdiv(N, _BLOCK)
    splits, cols_per_split = _splits(row_blocks * column_blocks, M, layout.meta["BLOCK_STREAM"], s.a.device)
    acc = s.a.dtype
    m_part = torch.empty(splits, N, dtype=acc, device=s.a.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(splits, N, layout.stride, dtype=acc, device=s.a.device) if with_wn else m_part
    neg_lo, neg_hi = _class_runs(s.yn_sorted, K)
    wrap_triton(_contrastive_forward_kernel)[(row_blocks, column_blocks, splits)](
        s.a_sorted,
        s.n_sorted,
        s.key_sorted,
        s.yn_sorted,
        s.pos[s.perm_a].contiguous(),
        neg_lo,
        neg_hi,
        m_part,
        l_part,
        acc_part,
        N,
        M,
        layout.k_sum,
        layout.stride,
        K,
        cols_per_split,
        *split(1.0 / temperature),
        BLOCK_D=layout.block_d if with_wn else 16,
        WITH_WN=with_wn,
        **layout.meta,
    )
    m = m_part.amax(0)
    scale = torch.exp(m_part - m)
    total = (l_part * scale).sum(0)
    valid = s.weight > 0
    lse = torch.empty_like(m).index_copy_(0, s.perm_a, m + total.log())
    lse = torch.where(valid, lse, s.pos)
    if not with_wn:
        return lse, None
    wn_sorted = (acc_part[:, :, :D] * scale[..., None]).sum(0) / total[:, None]
    wn = torch.empty_like(wn_sorted).index_copy_(0, s.perm_a, wn_sorted)
    return lse, torch.where(valid[:, None], wn, 0.0)


def _negative_grad(s: _Sorted, K: int, lse: torch.Tensor, coef: torch.Tensor, temperature: float) -> torch.Tensor:
    """dℓ/dn̂ (N⁻, D) in original negative order, accumulator dtype."""
    (N, D), M = s.a.shape, s.n.shape[0]
    layout = s.layout
    column_blocks = layout.stride // layout.block_d
    neg_blocks = triton.cdiv(M, _BLOCK)
    splits, rows_per_split = _splits(neg_blocks * column_blocks, N, layout.meta["BLOCK_STREAM"], s.a.device)
    dn_part = torch.empty(splits, M, layout.stride, dtype=s.a.dtype, device=s.a.device)
    anchor_lo, anchor_hi = _class_runs(s.key_sorted, K)
    wrap_triton(_contrastive_negative_grad_kernel)[(neg_blocks, column_blocks, splits)](
        s.a_sorted,
        s.n_sorted,
        s.key_sorted,
        s.yn_sorted,
        lse[s.perm_a].contiguous(),
        coef[s.perm_a].contiguous(),
        anchor_lo,
        anchor_hi,
        dn_part,
        N,
        M,
        layout.k_sum,
        layout.stride,
        K,
        rows_per_split,
        *split(1.0 / temperature),
        BLOCK_D=layout.block_d,
        **layout.meta,
    )
    dn_sorted = dn_part[:, :, :D].sum(0)
    return torch.empty_like(dn_sorted).index_copy_(0, s.perm_n, dn_sorted)


def _normalize_backward(x, xhat, dxhat):
    norm = x.to(xhat.dtype).norm(dim=1, keepdim=True)
    proj = dxhat - xhat * (xhat * dxhat).sum(1, keepdim=True)
    return torch.where(norm > _NORM_EPS, proj, dxhat) / norm.clamp_min(_NORM_EPS)


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
    check_args(*args, allow_empty=True)
    s = _prepare(*args)
    K = positives.shape[0]
    lse, wn = s.pos, None
    if anchors.shape[0] > 0 and negatives.shape[0] > 0:
        lse, wn = _softmax_sums(s, K, temperature, save_weighted_negatives)
    loss = (s.weight * torch.where(s.weight > 0, lse - s.pos, 0.0)).sum()
    dtype = anchors.dtype
    if not save_weighted_negatives:
        return loss.to(dtype), lse.to(dtype), anchors.new_empty(0)
    return loss.to(dtype), lse.to(dtype), (torch.zeros_like(s.a) if wn is None else wn).to(dtype)


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
    check_backward_args(
        grad_loss,
        anchors,
        anchor_labels,
        negatives,
        negative_labels,
        positives,
        has_positive,
        lse,
        weighted_negatives,
        temperature,
    )
    saved = tuple(weighted_negatives.shape) != (0,)
    s = _prepare(anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature)
    K = positives.shape[0]
    N, M = anchors.shape[0], negatives.shape[0]
    acc = s.a.dtype
    lse = lse.to(acc)
    coef = grad_loss.reshape(()).to(acc) * s.weight / temperature
    pi_pos = torch.where(s.weight > 0, (s.pos - lse).exp(), 1.0)
    da = (coef * (pi_pos - 1))[:, None] * s.p_of_anchor
    if saved:  # forward's Σ_j π_ij n̂_j: the negatives' part without a pass over the tiles
        da = da + coef[:, None] * weighted_negatives.to(acc)
    elif N > 0 and M > 0:
        da = da + coef[:, None] * _softmax_sums(s, K, temperature, True)[1]
    grad_negatives = anchors.new_empty(0)
    if need_grad_negatives:
        dn = torch.zeros_like(s.n)
        if N > 0 and M > 0:
            dn = _negative_grad(s, K, lse, coef, temperature)
        grad_negatives = _normalize_backward(negatives, s.n, dn).to(negatives.dtype)
    return _normalize_backward(anchors, s.a, da).to(anchors.dtype), grad_negatives
