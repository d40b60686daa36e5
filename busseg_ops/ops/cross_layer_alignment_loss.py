"""Cross-layer relation alignment (CRA, RA-BUSSeg; SPEC §2): proxy sampling, index mapping,
proxy gathering and the alignment loss. Public ops, fake kernels, autograd."""

from __future__ import annotations

import math
import os

import torch

from . import _validate, reference
from .backends import selected_backend
from .reference import cra as _ref

_ops = torch.ops.busseg

#: Greedy sampling is sequential over the M steps and each step reads the feature row of the
#: pixel just chosen (an address that comes from memory), which does not fit Triton's model
#: (and its interpreter); it has no Triton backend.
SAMPLING_BACKENDS = ("reference", "cpu", "cuda")
STRATEGIES = ("greedy", "random", "kmeans", "patch")


def _index_tensor(name: str, t, shape: tuple[int, ...], layout: str) -> None:
    _validate.tensor(name, t, len(shape), layout, floating=False)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {layout} = {shape}, got {tuple(t.shape)}")


def _first_proxies(feat, first, label, generator):
    B, _, H, W = feat.shape
    if first is not None:
        _index_tensor("first", first, (B,), "(B,)")
        _validate.same("feat and first", feat, first)
        # (a data-dependent check: under torch.compile the C++ op checks the range instead)
        if not torch.compiler.is_compiling() and bool(((first < 0) | (first >= H * W)).any()):
            raise ValueError(f"first must hold pixel indices in [0, H*W = {H * W}), got {first.tolist()}")
        return first.long()
    if label is not None:
        if not isinstance(label, torch.Tensor):
            raise TypeError(f"label must be a torch.Tensor, got {type(label).__name__}")
        if tuple(label.shape) != (B, H, W):
            raise ValueError(
                f"label must be (B, H, W) = {(B, H, W)} at the feature grid (downsample "
                f"it with nearest), got {tuple(label.shape)}"
            )
        _validate.same("feat and label", feat, label)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return _ref.first_proxy_index(label, B, H * W, generator, feat.device)


def _check_feat_and_count(feat, num_proxies):
    _validate.tensor("feat", feat, 4, "(B, C, H, W)")
    _validate.integer("num_proxies", num_proxies, minimum=1)
    hw = feat.shape[2] * feat.shape[3]
    if num_proxies > hw:
        raise ValueError(f"num_proxies must be <= H*W = {hw} (distinct pixels), got {num_proxies}")


def greedy_proxy_sampling(
    feat: torch.Tensor,
    num_proxies: int = 64,
    first=None,
    label=None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
):
    """Greedy "weak cross-correlation" proxies (SPEC §2.1): (B, M) int64 distinct pixel indices.

    The first proxy of image b is ``first[b]`` if given, else a uniform foreground pixel of
    ``label`` (B, H, W), else (no label or no foreground) a uniform pixel, drawn with
    ``generator``. Each next proxy minimises the running max of the cumulative similarity
    scale*<feat_i, feat_j> to the proxies chosen so far (ties to the smallest index). Only one
    row of the similarity map is computed per step. No gradient.
    """
    _check_feat_and_count(feat, num_proxies)
    s0 = _first_proxies(feat, first, label, generator)
    scale = feat.shape[1] ** -0.5 if scale is None else float(scale)
    backend = selected_backend(feat.device, supported=SAMPLING_BACKENDS)
    with torch.no_grad():
        if backend == "reference":
            return reference.greedy_proxy_sampling(feat.detach(), s0, num_proxies, scale)
        return _ops.cra_greedy_sampling(feat.detach(), s0, num_proxies, scale)


def sample_proxies(
    feat: torch.Tensor,
    num_proxies: int = 64,
    strategy: str = "greedy",
    first=None,
    label=None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    kmeans_iterations: int = 10,
):
    """Proxy pixels by ``strategy`` (seed supplementary Table 4), all (B, M) int64 distinct:
    ``greedy`` (ours, :func:`greedy_proxy_sampling`), ``random`` (uniform without replacement),
    ``kmeans`` (pixels nearest to k-means centres, k-means++ seeding) or ``patch``
    (one per cell of a rows x cols grid with rows*cols = M: the pixel nearest to the cell's mean
    feature). ``first``/``label``/``scale`` apply to greedy only."""
    _validate.choice("strategy", strategy, STRATEGIES)
    if strategy == "greedy":
        return greedy_proxy_sampling(feat, num_proxies, first, label, scale, generator)
    _check_feat_and_count(feat, num_proxies)
    B, _, H, W = feat.shape
    with torch.no_grad():
        if strategy == "random":
            return _ref.random_proxies(B, H * W, num_proxies, generator, feat.device)
        if strategy == "kmeans":
            _validate.integer("kmeans_iterations", kmeans_iterations, minimum=0)
            return _ref.kmeans_proxies(feat.detach(), num_proxies, kmeans_iterations, generator)
        return _ref.patch_proxies(feat.detach(), num_proxies)


def _grid(name: str, hw) -> tuple[int, int]:
    if (
        not isinstance(hw, (tuple, list))
        or len(hw) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {hw!r}")
    return int(hw[0]), int(hw[1])


def map_proxy_indices(idx: torch.Tensor, src_hw, dst_hw) -> torch.Tensor:
    """Pixel indices on an (H, W) grid -> the top-left pixel of their block on a finer (H2, W2)
    grid: f = ceil(W2 / W), j = (i // W)*f*W2 + (i % W)*f (SPEC §2.1)."""
    _validate.tensor("idx", idx, None, floating=False, allow_empty=True)
    H, W = _grid("src_hw", src_hw)
    H2, W2 = _grid("dst_hw", dst_hw)
    f = math.ceil(W2 / W)
    if (H - 1) * f >= H2 or (W - 1) * f >= W2:
        raise ValueError(
            f"dst_hw={(H2, W2)} is too small for src_hw={(H, W)}: with f = ceil(W2/W) "
            f"= {f} the last row/column would map outside it"
        )
    return (idx // W) * f * W2 + (idx % W) * f


def gather_proxies(feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Proxy features (B, M, C) of ``feat`` (B, C, H, W) at pixel indices ``idx`` (B, M); keeps
    the gradient to ``feat``."""
    _validate.tensor("feat", feat, 4, "(B, C, H, W)")
    B, C, H, W = feat.shape
    _validate.tensor("idx", idx, 2, "(B, M)", floating=False)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    _validate.same("feat and idx", feat, idx, dims=(0,))
    if not torch.compiler.is_compiling() and bool(((idx < 0) | (idx >= H * W)).any()):
        raise ValueError(f"idx must hold pixel indices in [0, H*W = {H * W})")
    return feat.flatten(2).gather(2, idx[:, None, :].expand(B, C, idx.shape[1])).transpose(1, 2)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _global_proxies(feats):
    """Every pixel a proxy (Table 4, row 2), when the (L, B, HW, HW) logits fit."""
    L, (B, _, H, W) = len(feats), feats[0].shape
    # logits, their per-layer products before stacking, and the logit gradient
    need = 3 * L * B * (H * W) ** 2 * feats[0].element_size()
    have = _available_bytes(feats[0].device)
    if need > have:
        raise RuntimeError(
            f"global alignment (proxies=None, every pixel a proxy) needs about {_size(need)} for "
            f"the (L, B, HW, HW) = ({L}, {B}, {H * W}, {H * W}) logits and their gradient, "
            f"but only {_size(have)} is available on {feats[0].device}; sample proxies "
            f"instead (greedy_proxy_sampling + gather_proxies)"
        )
    return [f.flatten(2).transpose(1, 2) for f in feats]


def _check_loss_inputs(feats, proxies):
    if not isinstance(feats, (list, tuple)) or len(feats) < 2:
        raise ValueError(
            f"feats must be a list of L >= 2 feature maps, got "
            f"{type(feats).__name__} of length {len(feats) if hasattr(feats, '__len__') else '?'}"
        )
    for l, f in enumerate(feats):
        _validate.tensor(f"feats[{l}]", f, 4, "(B, C_l, H, W)")
        _validate.same(f"feats[0] and feats[{l}]", feats[0], f, dims=(0, 2, 3), dtype=True)
    if proxies is None:
        return
    if not isinstance(proxies, (list, tuple)) or len(proxies) != len(feats):
        raise ValueError(f"proxies must be a list of L = {len(feats)} tensors (B, M, C_l), one per layer of feats")
    for l, (f, p) in enumerate(zip(feats, proxies)):
        _validate.tensor(f"proxies[{l}]", p, 3, "(B, M, C_l)")
        _validate.same(f"feats[{l}] and proxies[{l}]", f, p, dtype=True)
        if p.shape[0] != f.shape[0] or p.shape[2] != f.shape[1] or p.shape[1] != proxies[0].shape[1]:
            raise ValueError(
                f"proxies[{l}] must be (B, M, C_l) = ({f.shape[0]}, "
                f"{proxies[0].shape[1]}, {f.shape[1]}), got {tuple(p.shape)}"
            )


def cross_layer_alignment_loss(feats, proxies=None, reduction: str = "mean", eps: float = 1e-10):
    """Cross-layer relation alignment loss (SPEC §2.2), shallow -> deep lists of L >= 2 layers.

    ``feats[l]`` (B, C_l, H, W) on one common grid; ``proxies[l]`` (B, M, C_l). With
    P_l = softmax over m of <feats_l[:, p], proxies_l[m]>, returns the mean over the L-1 adjacent
    pairs of KL(P_{l+1} || P_l) computed like ``KLDivLoss(reduction)(log(P_l + eps), P_{l+1})``.
    ``proxies=None`` is global alignment (every pixel a proxy), where the HW x HW logits fit.
    Gradients flow to every input that requires grad, targets included.
    """
    _check_loss_inputs(feats, proxies)
    _validate.choice("reduction", reduction, ("mean", "batchmean", "sum"))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if proxies is None:
        proxies = _global_proxies(feats)
    backend = selected_backend(feats[0].device)
    if backend == "reference":
        return reference.cross_layer_alignment_loss(feats, proxies, reduction, float(eps))
    if backend == "triton":
        # Logits by BLAS: (B, HW, C) @ (B, C, M) per layer, stacked to (L, B, HW, M).
        logits = torch.stack(
            [torch.matmul(f.flatten(2).transpose(1, 2), p.transpose(1, 2)) for f, p in zip(feats, proxies)]
        )
        loss, _ = _ops.cra_align_forward_triton(logits, reduction, float(eps))
        return loss
    # cpu / cuda: blocks of pixel rows straight from the (B, C_l, HW) views of the maps. When
    # only the proxies need a gradient (upstream: detached maps), forward forms it from the logit
    # blocks it already has and backward just scales it (no recomputed logits).
    rows = block_rows(len(feats), feats[0].shape[0], proxies[0].shape[1], feats[0].element_size(), feats[0].device)
    grad_proxies = (
        torch.is_grad_enabled() and any(p.requires_grad for p in proxies) and not any(f.requires_grad for f in feats)
    )
    loss, _, _ = _ops.cra_align_blocked_forward(
        [f.flatten(2) for f in feats], list(proxies), reduction, float(eps), rows, grad_proxies
    )
    return loss


#: Bytes of one (L, B, rows, M) logit block (the driver balances the blocks). Few, large blocks
#: keep the number of BLAS calls and thread fork/joins low (at the upstream setting 8 MiB is four
#: blocks of 1057 rows); a GPU gets larger blocks for parallelism.
BLOCK_BYTES = {"cpu": 8 << 20, "cuda": 32 << 20}


def block_rows(L: int, B: int, M: int, element_size: int, device: torch.device) -> int:
    """Pixel rows per block of the blocked CRA loss ops, so that the block buffer is at most
    ``BLOCK_BYTES`` of the device."""
    budget = BLOCK_BYTES.get(torch.device(device).type, BLOCK_BYTES["cpu"])
    return max(1, budget // (L * B * M * element_size))


def align_norm(shape, reduction: str) -> float:
    """Factor on the summed KL terms of logits (L, B, HW, M): 1 / ((L-1) * d), d = B*HW*M
    ("mean"), B ("batchmean") or 1 ("sum"). The C++ driver (csrc/cra_driver.h) computes the same."""
    L, B, HW, M = shape
    return 1.0 / ((L - 1) * {"mean": B * HW * M, "batchmean": B, "sum": 1}[reduction])


def _fake_greedy(feat, first, num_proxies, scale):
    return first.new_empty(feat.shape[0], num_proxies)


def _fake_blocked_forward(feats, proxies, reduction, eps, block_rows, grad_proxies):
    f = feats[0]
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    return (
        f.new_empty(()),
        f.new_empty((len(feats), f.shape[0], f.shape[2]), dtype=acc),
        [p.new_empty(p.shape) for p in proxies] if grad_proxies else [],
    )


def _fake_blocked_backward(
    grad_loss, feats, proxies, lse, reduction, eps, block_rows, need_grad_feats, need_grad_proxies
):
    return (
        [f.new_empty(f.shape) for f in feats] if need_grad_feats else [],
        [p.new_empty(p.shape) for p in proxies] if need_grad_proxies else [],
    )


def _blocked_setup_context(ctx, inputs, output):
    feats, proxies, reduction, eps, rows, _ = inputs
    ctx.save_for_backward(*feats, *proxies, output[1], *output[2])
    ctx.params = (reduction, eps, rows)
    ctx.wants = ([f.requires_grad for f in feats], [p.requires_grad for p in proxies])
    ctx.mark_non_differentiable(output[1], *output[2])


def _blocked_backward(ctx, grad_loss, _grad_lse, _grad_grads):
    want_f, want_p = ctx.wants
    L = len(want_f)
    saved = ctx.saved_tensors
    feats, proxies, lse, unit_grads = saved[:L], saved[L : 2 * L], saved[2 * L], saved[2 * L + 1 :]
    need_f, need_p = any(want_f), any(want_p) and not unit_grads
    grad_f, grad_p = [None] * L, [None] * L
    if need_f or need_p:
        gf, gp = _ops.cra_align_blocked_backward(grad_loss, feats, proxies, lse, *ctx.params, need_f, need_p)
        grad_f = [g if w else None for g, w in zip(gf, want_f)] if need_f else grad_f
        grad_p = [g if w else None for g, w in zip(gp, want_p)] if need_p else grad_p
    if unit_grads:  # formed in forward for grad_loss = 1
        grad_p = [grad_loss * g if w else None for g, w in zip(unit_grads, want_p)]
    return grad_f, grad_p, None, None, None, None


def register_autograd(forward_op: str, backward_op) -> None:
    """Autograd for a CRA loss forward op on stacked logits (the Triton backend) whose backward is
    the op ``backward_op``."""

    def setup_context(ctx, inputs, output):
        logits, reduction, eps = inputs
        ctx.save_for_backward(logits, output[1])
        ctx.params = (reduction, eps)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_loss, _grad_lse):
        logits, lse = ctx.saved_tensors
        return backward_op(grad_loss, logits, lse, *ctx.params), None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


torch.library.register_fake("busseg::cra_greedy_sampling")(_fake_greedy)
torch.library.register_fake("busseg::cra_align_blocked_forward")(_fake_blocked_forward)
torch.library.register_fake("busseg::cra_align_blocked_backward")(_fake_blocked_backward)
torch.library.register_autograd(
    "busseg::cra_align_blocked_forward", _blocked_backward, setup_context=_blocked_setup_context
)
