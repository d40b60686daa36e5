"""busseg_triton::adjacent_relation_propagation (RA-BUSSeg ARP; docs/ops.md) in Triton, on NCHW
tensors as they lie (no permuted copies). Reading the features bounds it, so the affinity kernel
computes half the taps (affinities are symmetric) and a tap's shifted tile is re-read from L1/L2,
never DRAM; how the four kernels work: docs/kernels.md. Sizes enter unspecialised
(``do_not_specialize``): a map whose rows happen to be 16-byte aligned would otherwise get vector
loads for its unshifted taps only, and the mix costs a shared-memory layout conversion per tile."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops.adjacent_relation_propagation import check_args, check_backward_args
from ._float_args import join, split


@triton.jit
def _tile(H, W, TILE_W: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's pixels: flat index, row, column, in the image. TILE_W == 0: BLOCK_P
    consecutive pixels of the row-major map (whole rows back to back); else a block of
    BLOCK_P // TILE_W rows by TILE_W columns."""
    i = tl.arange(0, BLOCK_P)
    if TILE_W == 0:
        p = tl.program_id(0) * BLOCK_P + i
        y = p // W
        x = p % W
        in_image = p < H * W
    else:
        tiles_w = tl.cdiv(W, TILE_W)
        y = tl.program_id(0) // tiles_w * (BLOCK_P // TILE_W) + i // TILE_W
        x = tl.program_id(0) % tiles_w * TILE_W + i % TILE_W
        in_image = (y < H) & (x < W)
        p = y * W + x
    return p, y, x, in_image


@triton.jit
def _tap(t, y, x, in_image, H, W, KS: tl.constexpr, DIL):
    """Offset of tap t's neighbour in the flat map, as a row part and a column part (taps of one
    row share the first; the second is a constant at dilation 1, folded into the loads), and
    whether it is a pixel of the image. Tap KS*KS-1-t has the opposite offset."""
    dy = (t // KS - KS // 2) * DIL
    dx = (t % KS - KS // 2) * DIL
    qy = y + dy
    qx = x + dx
    return dy * W, dx, in_image & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)


@triton.jit(do_not_specialize=["H", "W", "C", "CPG"])  # sizes: see the module docstring
def _affinity_kernel(
    feat,
    partial,
    H,
    W,
    C,
    CPG,
    DIL,
    KS: tl.constexpr,
    UNROLL: tl.constexpr,
    TILE_W: tl.constexpr,
    EVEN_C: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """partial[g, b, h, p] = <f_p, f_q> over channel group g (CPG channels) for tap T//2 + h (the
    centre and the taps after it)."""
    g = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    HALF: tl.constexpr = KS * KS // 2 + 1
    p, y, x, in_image = _tile(H, W, TILE_W, BLOCK_P)
    c_end = tl.minimum(C, (g + 1) * CPG)
    feat_b = feat + b.to(tl.int64) * C * HW
    out = partial + (g * tl.num_programs(2) + b).to(tl.int64) * HALF * HW
    if UNROLL:
        h_index = tl.arange(0, HALF_PAD)
        acc = tl.zeros([HALF_PAD, BLOCK_P], ACC)
        centre_at = feat_b + (g * CPG + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None] * HW + p[None, :]
        for c0 in range(g * CPG, c_end, BLOCK_C):
            chan = (c0 + tl.arange(0, BLOCK_C) < c_end)[:, None] | EVEN_C  # EVEN_C: no mask per channel
            centre = tl.load(centre_at, mask=chan & in_image[None, :], other=0.0).to(ACC)
            for h in tl.static_range(HALF):
                if h == 0:
                    dot = tl.sum(centre * centre, 0)
                else:
                    dy, dx, inside = _tap(KS * KS // 2 + h, y, x, in_image, H, W, KS, DIL)
                    nb = tl.load(centre_at + dy + dx, mask=chan & inside[None, :], other=0.0)
                    dot = tl.sum(centre * nb.to(ACC), 0)
                acc = tl.where(h_index[:, None] == h, acc + dot[None, :], acc)
            centre_at += BLOCK_C * HW
        tl.store(out + h_index[:, None] * HW + p[None, :], acc, mask=(h_index < HALF)[:, None] & in_image[None, :])
    else:  # one tap at a time over the group's channels (the centre re-read per tap, from L1/L2)
        for h in range(HALF):
            dy, dx, inside = _tap(KS * KS // 2 + h, y, x, in_image, H, W, KS, DIL)
            dot = tl.zeros([BLOCK_P], ACC)
            for c0 in range(g * CPG, c_end, BLOCK_C):
                centre_at = feat_b + (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None] * HW + p[None, :]
                chan = (c0 + tl.arange(0, BLOCK_C) < c_end)[:, None] | EVEN_C
                centre = tl.load(centre_at, mask=chan & in_image[None, :], other=0.0)
                nb = tl.load(centre_at + dy + dx, mask=chan & inside[None, :], other=0.0)
                dot += tl.sum(centre.to(ACC) * nb.to(ACC), 0)
            tl.store(out + h * HW + p, dot, mask=in_image)


@triton.jit
def _tap_affinity(
    partial_b,
    G,
    group_stride,
    t,
    p,
    y,
    x,
    in_image,
    H,
    W,
    scale,
    KS: tl.constexpr,
    DIL,
    VALID: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
):
    """a[p, t]: the channel groups' partial dots of tap t (loaded together: no chain of dependent
    loads), scaled. Taps before the centre read their mirror at the neighbour (<f_p, f_q> =
    <f_q, f_p>). Outside the image: 0 (zeros padding, a feature of 0) or -inf (valid: out of the
    softmax)."""
    dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
    own = t >= KS * KS // 2
    at = partial_b + (tl.where(own, t, KS * KS - 1 - t) - KS * KS // 2) * H * W + tl.where(own, p, p + dy + dx)
    groups = tl.arange(0, GROUPS_PAD)[:, None]
    dots = tl.load(at[None, :] + groups * group_stride, mask=(groups < G) & inside[None, :], other=0.0)
    a = tl.sum(dots, 0) * scale
    if VALID:
        a = tl.where(inside, a, float("-inf"))
    return a


@triton.jit(do_not_specialize=["H", "W", "K"])  # sizes: see the module docstring
def _softmax_kernel(
    partial,
    value,
    out,
    weights,
    H,
    W,
    K,
    G,
    DIL,
    scale_hi,
    scale_lo,
    KS: tl.constexpr,
    VALID: tl.constexpr,
    UNROLL: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(1)
    HW = H * W
    T: tl.constexpr = KS * KS
    scale = join(scale_hi, scale_lo, ACC)
    p, y, x, in_image = _tile(H, W, 0, BLOCK_P)
    partial_b = partial + b.to(tl.int64) * (T // 2 + 1) * HW
    group_stride = tl.num_programs(1).to(tl.int64) * (T // 2 + 1) * HW  # partial is (G, B, T//2+1, H, W)
    value_b = value + b.to(tl.int64) * K * HW
    out_b = out + b.to(tl.int64) * K * HW
    weights_b = weights + b.to(tl.int64) * T * HW
    taps = tl.arange(0, TAPS_PAD)
    if UNROLL:
        a = tl.full([TAPS_PAD, BLOCK_P], float("-inf"), ACC)
        for t in tl.static_range(T):
            a_t = _tap_affinity(
                partial_b, G, group_stride, t, p, y, x, in_image, H, W, scale, KS, DIL, VALID, GROUPS_PAD
            )
            a = tl.where(taps[:, None] == t, a_t[None, :], a)
        amax = tl.where(in_image, tl.max(a, 0), 0.0)  # pixels past the image: all -inf
        e = tl.exp(a - amax[None, :])
        w = e / tl.sum(e, 0)[None, :]
        tl.store(weights_b + taps[:, None] * HW + p[None, :], w, mask=(taps < T)[:, None] & in_image[None, :])
    else:  # max, sum and weights in passes over the taps, each affinity recomputed from the partials
        amax = tl.full([BLOCK_P], float("-inf"), ACC)
        for t in range(T):
            a_t = _tap_affinity(
                partial_b, G, group_stride, t, p, y, x, in_image, H, W, scale, KS, DIL, VALID, GROUPS_PAD
            )
            amax = tl.maximum(amax, a_t)
        amax = tl.where(in_image, amax, 0.0)
        total = tl.zeros([BLOCK_P], ACC)
        for t in range(T):
            a_t = _tap_affinity(
                partial_b, G, group_stride, t, p, y, x, in_image, H, W, scale, KS, DIL, VALID, GROUPS_PAD
            )
            total += tl.exp(a_t - amax)
        for t in range(T):
            a_t = _tap_affinity(
                partial_b, G, group_stride, t, p, y, x, in_image, H, W, scale, KS, DIL, VALID, GROUPS_PAD
            )
            tl.store(weights_b + t * HW + p, tl.exp(a_t - amax) / total, mask=in_image)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rows = ks[:, None] * HW
        acc = tl.zeros([BLOCK_K, BLOCK_P], ACC)
        if UNROLL:
            for t in tl.static_range(T):
                dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
                w_t = tl.sum(tl.where(taps[:, None] == t, w, 0.0), 0)
                v = tl.load(
                    value_b + rows + (p + dy + dx)[None, :], mask=(ks < K)[:, None] & inside[None, :], other=0.0
                )
                acc += w_t[None, :] * v.to(ACC)
        else:
            for t in range(T):
                dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
                a_t = _tap_affinity(
                    partial_b, G, group_stride, t, p, y, x, in_image, H, W, scale, KS, DIL, VALID, GROUPS_PAD
                )
                w_t = tl.exp(a_t - amax) / total
                v = tl.load(
                    value_b + rows + (p + dy + dx)[None, :], mask=(ks < K)[:, None] & inside[None, :], other=0.0
                )
                acc += w_t[None, :] * v.to(ACC)
        tl.store(out_b + rows + p[None, :], acc, mask=(ks < K)[:, None] & in_image[None, :])


@triton.jit(do_not_specialize=["H", "W", "K"])  # sizes: see the module docstring
def _pixel_grad_kernel(
    grad_out,
    value,
    weights,
    da,
    grad_value,
    H,
    W,
    K,
    DIL,
    scale_hi,
    scale_lo,
    KS: tl.constexpr,
    UNROLL: tl.constexpr,
    NEED_DA: tl.constexpr,
    NEED_DV: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """da[b, t, p] = scale * w * (dw - sum_t' w dw) with dw[t] = sum_k g[k, p] value[k, p + o_t];
    grad_value[k, p] = sum_t w[t, p - o_t] * g[k, p - o_t] (the pixels whose tap t lands on p)."""
    b = tl.program_id(1)
    HW = H * W
    T: tl.constexpr = KS * KS
    scale = join(scale_hi, scale_lo, ACC)
    p, y, x, in_image = _tile(H, W, 0, BLOCK_P)
    grad_b = grad_out + b.to(tl.int64) * K * HW
    value_b = value + b.to(tl.int64) * K * HW
    weights_b = weights + b.to(tl.int64) * T * HW
    da_b = da + b.to(tl.int64) * T * HW
    taps = tl.arange(0, TAPS_PAD)
    if NEED_DA:
        if UNROLL:
            dw = tl.zeros([TAPS_PAD, BLOCK_P], ACC)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                rows = ks[:, None] * HW
                g = tl.load(grad_b + rows + p[None, :], mask=(ks < K)[:, None] & in_image[None, :], other=0.0)
                for t in tl.static_range(T):
                    dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
                    v = tl.load(
                        value_b + rows + (p + dy + dx)[None, :], mask=(ks < K)[:, None] & inside[None, :], other=0.0
                    )
                    dw = tl.where(taps[:, None] == t, dw + tl.sum(g.to(ACC) * v.to(ACC), 0)[None, :], dw)
            tap_mask = (taps < T)[:, None] & in_image[None, :]
            w = tl.load(weights_b + taps[:, None] * HW + p[None, :], mask=tap_mask, other=0.0).to(ACC)
            tl.store(
                da_b + taps[:, None] * HW + p[None, :], scale * w * (dw - tl.sum(w * dw, 0)[None, :]), mask=tap_mask
            )
        else:  # dw of each tap into da first, then da in place
            wdw = tl.zeros([BLOCK_P], ACC)
            for t in range(T):
                dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
                dw_t = tl.zeros([BLOCK_P], ACC)
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    rows = ks[:, None] * HW
                    g = tl.load(grad_b + rows + p[None, :], mask=(ks < K)[:, None] & in_image[None, :], other=0.0)
                    v = tl.load(
                        value_b + rows + (p + dy + dx)[None, :], mask=(ks < K)[:, None] & inside[None, :], other=0.0
                    )
                    dw_t += tl.sum(g.to(ACC) * v.to(ACC), 0)
                tl.store(da_b + t * HW + p, dw_t, mask=in_image)
                wdw += tl.load(weights_b + t * HW + p, mask=in_image, other=0.0).to(ACC) * dw_t
            tl.debug_barrier()  # the dw stored above, whichever thread of the program stored it
            for t in range(T):
                w_t = tl.load(weights_b + t * HW + p, mask=in_image, other=0.0).to(ACC)
                dw_t = tl.load(da_b + t * HW + p, mask=in_image, other=0.0)
                tl.store(da_b + t * HW + p, scale * w_t * (dw_t - wdw), mask=in_image)
    if NEED_DV:
        grad_value_b = grad_value + b.to(tl.int64) * K * HW
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            rows = ks[:, None] * HW
            acc = tl.zeros([BLOCK_K, BLOCK_P], ACC)
            if UNROLL:
                for t in tl.static_range(T):
                    acc += _value_grad_term(grad_b, weights_b, rows, ks, K, t, y, x, in_image, p, H, W, KS, DIL, ACC)
            else:
                for t in range(T):
                    acc += _value_grad_term(grad_b, weights_b, rows, ks, K, t, y, x, in_image, p, H, W, KS, DIL, ACC)
            tl.store(grad_value_b + rows + p[None, :], acc, mask=(ks < K)[:, None] & in_image[None, :])


@triton.jit
def _value_grad_term(
    grad_b, weights_b, rows, ks, K, t, y, x, in_image, p, H, W, KS: tl.constexpr, DIL, ACC: tl.constexpr
):
    """w[t, s] * g[:, s] for the pixel s = p - o_t whose tap t lands on p (tap T-1-t's neighbour)."""
    dy, dx, inside = _tap(KS * KS - 1 - t, y, x, in_image, H, W, KS, DIL)
    w = tl.load(weights_b + t * H * W + p + dy + dx, mask=inside, other=0.0).to(ACC)
    g = tl.load(grad_b + rows + (p + dy + dx)[None, :], mask=(ks < K)[:, None] & inside[None, :], other=0.0)
    return w[None, :] * g.to(ACC)


@triton.jit
def _coupling(da_b, t, p, y, x, in_image, H, W, KS: tl.constexpr, DIL):
    """E[p, t] = da[p, t] + da[q, T-1-t] with q = p + o_t: p as the query of q and as its key (the
    mirror tap of q lands on p). 0 where q is outside (its feature is 0)."""
    dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
    own = tl.load(da_b + t * H * W + p, mask=inside, other=0.0)
    return own + tl.load(da_b + (KS * KS - 1 - t) * H * W + p + dy + dx, mask=inside, other=0.0)


@triton.jit
def _coupled_tap(e_t, feat_at, chan, t, y, x, in_image, H, W, KS: tl.constexpr, DIL, ACC: tl.constexpr):
    """E[p, t] * feat[c, p + o_t] for a chunk of channels (feat_at: the chunk at p)."""
    dy, dx, inside = _tap(t, y, x, in_image, H, W, KS, DIL)
    f = tl.load(feat_at + dy + dx, mask=chan & inside[None, :], other=0.0)
    return e_t[None, :] * f.to(ACC)


@triton.jit(do_not_specialize=["H", "W", "C", "CPG"])  # sizes: see the module docstring
def _feat_grad_kernel(
    feat,
    da,
    grad_feat,
    H,
    W,
    C,
    CPG,
    DIL,
    KS: tl.constexpr,
    UNROLL: tl.constexpr,
    TILE_W: tl.constexpr,
    EVEN_C: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """grad_feat[c, p] = sum_t E[p, t] * feat[c, p + o_t] over channel group g (CPG channels)."""
    g = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    T: tl.constexpr = KS * KS
    p, y, x, in_image = _tile(H, W, TILE_W, BLOCK_P)
    c_end = tl.minimum(C, (g + 1) * CPG)
    da_b = da + b.to(tl.int64) * T * HW
    taps = tl.arange(0, TAPS_PAD)
    if UNROLL:
        e = tl.zeros([TAPS_PAD, BLOCK_P], ACC)
        for t in tl.static_range(T):
            e = tl.where(taps[:, None] == t, _coupling(da_b, t, p, y, x, in_image, H, W, KS, DIL)[None, :], e)
    lanes = (b * C + g * CPG + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None] * HW + p[None, :]
    feat_at = feat + lanes
    grad_at = grad_feat + lanes
    for c0 in range(g * CPG, c_end, BLOCK_C):
        chan = (c0 + tl.arange(0, BLOCK_C) < c_end)[:, None] | EVEN_C  # EVEN_C: no mask per channel
        acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
        if UNROLL:
            for t in tl.static_range(T):
                e_t = tl.sum(tl.where(taps[:, None] == t, e, 0.0), 0)
                acc += _coupled_tap(e_t, feat_at, chan, t, y, x, in_image, H, W, KS, DIL, ACC)
        else:
            for t in range(T):
                e_t = _coupling(da_b, t, p, y, x, in_image, H, W, KS, DIL)
                acc += _coupled_tap(e_t, feat_at, chan, t, y, x, in_image, H, W, KS, DIL, ACC)
        tl.store(grad_at, acc, mask=chan & in_image[None, :])
        feat_at += BLOCK_C * HW
        grad_at += BLOCK_C * HW


# ---- launchers ------------------------------------------------------------------------------------

#: The feature kernels (the 35 MB): 8 warps, one pixel per thread. Whole rows back to back while a
#: row is at most half a tile (the halo rows above and below then add at most one tile of L2
#: reads); wider maps in blocks of 8 rows x 32 columns (a warp per row segment).
_BLOCK_P = 256
_NUM_WARPS = 8
_TILE_W = 32
#: Channels per step of the feature kernels. A step issues every tap's loads at once (unrolled
#: taps), so these bound the registers: at 8 (affinity, 5 taps) and 4 (gradient, 9 taps) the 3x3
#: kernels take 40 and 75 registers on sm_90, at 16 and 8 they took 128 and 150 (ptxas's register
#: cap, maxnreg, only spills: the loads are scheduled together before it). Halved in float64 (two
#: registers a value) and at dilation > 1 (a tap's column offset is then no constant folded into
#: the load, so each tap needs an address of its own: the affinity kernel took 158 registers at 8).
_BLOCK_C = 8
_GRAD_BLOCK_C = 4
#: The per-pixel kernels (a few MB: partial sums, weights, values, da): 4 warps, whole rows back to
#: back; value channels in blocks of at most 4 (blocks of 8 took up to 245 registers in float64).
_PIXEL_BLOCK = 128
_PIXEL_WARPS = 4
_MAX_BLOCK_K = 4
#: The feature kernels split the channels into groups until there are about this many programs:
#: 8 per SM of a 132-SM GPU, so that the programs left for the last SMs are a small part of the
#: work (B=8, 65x65: 136 tiles, 8 groups). At most 8 groups: the softmax kernel loads the partial
#: sums of every group for every tap at once.
_PROGRAMS = 1024
_MAX_GROUPS = 8
#: Taps unrolled up to 3x3; larger kernels loop over taps at run time (unrolled, a 5x5 kernel
#: keeps too many loads in flight and spilled registers in every kernel).
_MAX_UNROLLED_KS = 3


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _block_c(most: int, C: int, dtype: torch.dtype, dilation: int) -> int:
    """Channels per step of a feature kernel (see above); at least 4 (each width is a compile)."""
    most = most // (2 if dtype == torch.float64 else 1) // (2 if dilation > 1 else 1)
    return min(most, max(4, triton.next_power_of_2(C)))


def _block_k(K: int) -> int:
    return min(_MAX_BLOCK_K, triton.next_power_of_2(max(1, K)))


def _feature_grid(B: int, C: int, H: int, W: int, block_c: int):
    """(tile width, channels per group, grid) of the feature kernels."""
    tile_w = 0 if 2 * W <= _BLOCK_P else _TILE_W
    if tile_w:
        tiles = triton.cdiv(H, _BLOCK_P // tile_w) * triton.cdiv(W, tile_w)
    else:
        tiles = triton.cdiv(H * W, _BLOCK_P)
    chunks = max(1, triton.cdiv(C, block_c))
    groups = min(chunks, _MAX_GROUPS, triton.cdiv(_PROGRAMS, max(1, tiles * B)))
    per_group = triton.cdiv(chunks, groups)
    return tile_w, per_group * block_c, (tiles, triton.cdiv(chunks, per_group), B)


@triton_op("busseg_triton::adjacent_relation_propagation", mutates_args=())
def adjacent_relation_propagation(
    feat: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int, scale: float, valid_padding: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    check_args(feat, value, kernel_size, dilation, allow_empty=True)
    feat, value = feat.contiguous(), value.contiguous()
    B, C, H, W = feat.shape
    K = value.shape[1]
    taps = kernel_size * kernel_size
    unroll = kernel_size <= _MAX_UNROLLED_KS
    acc_dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32
    block_c = _block_c(_BLOCK_C, C, feat.dtype, dilation)
    tile_w, per_group, grid = _feature_grid(B, C, H, W, block_c)
    partial = torch.empty(grid[1], B, taps // 2 + 1, H, W, dtype=acc_dtype, device=feat.device)
    wrap_triton(_affinity_kernel)[grid](
        feat,
        partial,
        H,
        W,
        C,
        per_group,
        dilation,
        KS=kernel_size,
        UNROLL=unroll,
        TILE_W=tile_w,
        EVEN_C=C % block_c == 0,
        HALF_PAD=triton.next_power_of_2(taps // 2 + 1),
        BLOCK_P=_BLOCK_P,
        BLOCK_C=block_c,
        ACC=_acc(feat),
        num_warps=_NUM_WARPS,
    )
    out = value.new_empty(B, K, H, W)
    weights = feat.new_empty(B, taps, H, W)
    wrap_triton(_softmax_kernel)[(triton.cdiv(H * W, _PIXEL_BLOCK), B)](
        partial,
        value,
        out,
        weights,
        H,
        W,
        K,
        grid[1],
        dilation,
        *split(scale),
        KS=kernel_size,
        VALID=valid_padding,
        UNROLL=unroll,
        GROUPS_PAD=triton.next_power_of_2(grid[1]),
        TAPS_PAD=triton.next_power_of_2(taps),
        BLOCK_P=_PIXEL_BLOCK,
        BLOCK_K=_block_k(K),
        ACC=_acc(feat),
        num_warps=_PIXEL_WARPS,
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
    check_backward_args(grad_out, feat, value, weights, kernel_size, dilation)
    grad_out, feat, value, weights = grad_out.contiguous(), feat.contiguous(), value.contiguous(), weights.contiguous()
    B, C, H, W = feat.shape
    K = value.shape[1]
    taps = kernel_size * kernel_size
    unroll = kernel_size <= _MAX_UNROLLED_KS
    acc_dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32
    grad_feat, grad_value = feat.new_empty(0), value.new_empty(0)
    if not (need_grad_feat or need_grad_value):
        return grad_feat, grad_value
    da = torch.empty(B, taps, H, W, dtype=acc_dtype, device=feat.device) if need_grad_feat else grad_feat
    if need_grad_value:
        grad_value = value.new_empty(B, K, H, W)
    wrap_triton(_pixel_grad_kernel)[(triton.cdiv(H * W, _PIXEL_BLOCK), B)](
        grad_out,
        value,
        weights,
        da,
        grad_value,
        H,
        W,
        K,
        dilation,
        *split(scale),
        KS=kernel_size,
        UNROLL=unroll,
        NEED_DA=need_grad_feat,
        NEED_DV=need_grad_value,
        TAPS_PAD=triton.next_power_of_2(taps),
        BLOCK_P=_PIXEL_BLOCK,
        BLOCK_K=_block_k(K),
        ACC=_acc(feat),
        num_warps=_PIXEL_WARPS,
    )
    if need_grad_feat:
        block_c = _block_c(_GRAD_BLOCK_C, C, feat.dtype, dilation)
        tile_w, per_group, grid = _feature_grid(B, C, H, W, block_c)
        grad_feat = feat.new_empty(B, C, H, W)
        wrap_triton(_feat_grad_kernel)[grid](
            feat,
            da,
            grad_feat,
            H,
            W,
            C,
            per_group,
            dilation,
            KS=kernel_size,
            UNROLL=unroll,
            TILE_W=tile_w,
            EVEN_C=C % block_c == 0,
            TAPS_PAD=triton.next_power_of_2(taps),
            BLOCK_P=_BLOCK_P,
            BLOCK_C=block_c,
            ACC=_acc(feat),
            num_warps=_NUM_WARPS,
        )
    return grad_feat, grad_value
