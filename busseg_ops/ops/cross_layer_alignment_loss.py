"""cross_layer_alignment_loss: the loss of RA-BUSSeg's cross-layer relation alignment (CRA).
Public function, fake kernels and autograd of ``busseg::cross_layer_alignment_loss``."""

from __future__ import annotations

import os

import torch

from .. import _validate
from ..backends import Op, autocast_inputs, dispatch, register
from ..reference.cross_layer_alignment_loss import cross_layer_alignment_loss as _reference


def _reference_blocked(feats, proxies, reduction, eps, block_rows, grad_proxies):
    """The reference with the native op's arguments and outputs (no blocks, no saved log-sum-exp,
    autograd by PyTorch). The flattened maps (B, C_l, HW) go in as (B, C_l, HW, 1) maps."""
    return _reference([f[..., None] for f in feats], proxies, reduction, eps), feats[0].new_empty(0), []


# Under autocast a loss in float32, as torch's own losses.
OP = Op("cross_layer_alignment_loss", reference=_reference_blocked, autocast="float32")

# ---- contract: the arguments of busseg::cross_layer_alignment_loss and its backward ------------
# Checked by the public function, the fake kernels and the Triton launchers alike; csrc/
# cross_layer_alignment_loss/checks.h guards direct calls of the C++ kernels with the same rules.

REDUCTIONS = ("mean", "batchmean", "sum")


def check_loss_args(feats, proxies, reduction, eps) -> None:
    """``feats``: L >= 2 maps (B, C_l, HW) and ``proxies``: L tensors (B, M, C_l), of one floating
    dtype and device; ``reduction`` one of REDUCTIONS, ``eps`` a finite float >= 0."""
    if not isinstance(feats, (list, tuple)) or len(feats) < 2:
        length = len(feats) if hasattr(feats, "__len__") else "?"
        raise ValueError(f"feats must be a list of L >= 2 feature maps, got {type(feats).__name__} of length {length}")
    if not isinstance(proxies, (list, tuple)) or len(proxies) != len(feats):
        raise ValueError(f"proxies must be a list of L = {len(feats)} tensors (B, M, C_l), one per layer of feats")
    for l, (f, p) in enumerate(zip(feats, proxies)):
        _validate.tensor(f"feats[{l}]", f, 3, "(B, C_l, HW)")
        _validate.tensor(f"proxies[{l}]", p, 3, "(B, M, C_l)")
        _validate.same(f"feats[0] and feats[{l}]", feats[0], f, dims=(0, 2), dtype=True)
        M = proxies[0].shape[1]
        _validate.same(f"feats[{l}] and proxies[{l}]", f, p, dtype=True)
        if tuple(p.shape) != (f.shape[0], M, f.shape[1]):
            raise ValueError(f"proxies[{l}] must be (B, M, C_l) = {(f.shape[0], M, f.shape[1])}, got {tuple(p.shape)}")
    _validate.choice("reduction", reduction, REDUCTIONS)
    _validate.real("eps", eps, minimum=0)


def check_args(feats, proxies, reduction, eps, block_rows) -> None:
    """The loss's arguments (:func:`check_loss_args`) and ``block_rows``, the pixel rows per block
    (>= 1; the public function sizes it with :func:`block_rows`)."""
    check_loss_args(feats, proxies, reduction, eps)
    _validate.integer("block_rows", block_rows, minimum=1)


def check_backward_args(grad_loss, feats, proxies, lse, reduction, eps, block_rows) -> None:
    """The forward's arguments, ``lse`` (L, B, HW) and the scalar ``grad_loss``, floating, on the
    device of feats."""
    check_args(feats, proxies, reduction, eps, block_rows)
    shape = (len(feats), feats[0].shape[0], feats[0].shape[2])
    _validate.tensor("lse", lse, 3, "(L, B, HW)")
    if tuple(lse.shape) != shape:
        raise ValueError(f"lse must be (L, B, HW) = {shape}, got {tuple(lse.shape)}")
    _validate.tensor("grad_loss", grad_loss)
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must be a scalar, got shape {tuple(grad_loss.shape)}")
    _validate.one_device(f"{OP.name}_backward", **{"feats[0]": feats[0]}, lse=lse, grad_loss=grad_loss)


#: Bytes of one (L, B, rows, M) logit block (the kernels balance the blocks). Few, large blocks
#: keep the number of BLAS calls and thread fork/joins low (at the upstream setting 8 MiB is four
#: blocks of 1057 rows); a GPU gets larger blocks for parallelism.
BLOCK_BYTES = {"cpu": 8 << 20, "cuda": 32 << 20}


def block_rows(L: int, B: int, M: int, element_size: int, device: torch.device) -> int:
    """Pixel rows per block of ``busseg::cross_layer_alignment_loss``, so that the block buffer is
    at most ``BLOCK_BYTES`` of the device."""
    budget = BLOCK_BYTES.get(torch.device(device).type, BLOCK_BYTES["cpu"])
    return max(1, budget // (L * B * M * element_size))


def cross_layer_alignment_loss(feats, proxies=None, reduction: str = "mean", eps: float = 1e-10):
    """Cross-layer relation alignment loss (RA-BUSSeg, CRA; docs/ops.md), shallow -> deep lists of
    L >= 2 layers.

    ``feats[l]`` (B, C_l, H, W) on one common grid; ``proxies[l]`` (B, M, C_l). With
    P_l[b, p, :] = softmax over m of <feats_l[b, :, p], proxies_l[b, m, :]>::

        loss = 1/(L-1) · Σ_{l=1}^{L-1} KL(P_{l+1} || P_l),
        KL(q || p) = Σ q · (log q − log(p + eps)) / d

    with d = B·HW·M (``"mean"``, upstream), B (``"batchmean"``) or 1 (``"sum"``), i.e.
    ``KLDivLoss(reduction)(log(P_l + eps), P_{l+1})``. ``proxies=None`` is global alignment (every
    pixel a proxy; Table 4 of the supplementary), where the HW x HW logits fit. Gradients flow to
    every input that requires grad, targets included. The (L, B, HW, M) logits never exist: the
    kernels work on blocks of pixel rows and keep only the per-row log-sum-exp for backward.
    Every floating dtype; float16 / bfloat16 are computed in float32 (the logits too, on the CPU)
    and the loss comes out in the inputs' dtype. Under torch.autocast the inputs are cast to float32.
    """
    feats, proxies = autocast_inputs(OP, feats, proxies)
    _check_maps(feats)
    if proxies is None:
        proxies = _global_proxies(feats)
    flat = [f.flatten(2) for f in feats]
    check_loss_args(flat, proxies, reduction, eps)
    eps, f0 = float(eps), feats[0]
    rows = block_rows(len(feats), f0.shape[0], proxies[0].shape[1], f0.element_size(), f0.device)
    # When only the proxies need a gradient (upstream: detached maps), forward forms it from the
    # logit blocks it already has and backward just scales it (no recomputed logits).
    grad_proxies = (
        torch.is_grad_enabled() and any(p.requires_grad for p in proxies) and not any(f.requires_grad for f in feats)
    )
    loss, _, _ = dispatch(OP, f0.device)(flat, list(proxies), reduction, eps, rows, grad_proxies)
    return loss


def _check_maps(feats) -> None:
    """The public form of feats: L >= 2 maps (B, C_l, H, W) on one grid (the contract sees them
    flattened)."""
    if not isinstance(feats, (list, tuple)) or len(feats) < 2:
        length = len(feats) if hasattr(feats, "__len__") else "?"
        raise ValueError(f"feats must be a list of L >= 2 feature maps, got {type(feats).__name__} of length {length}")
    for l, f in enumerate(feats):
        _validate.tensor(f"feats[{l}]", f, 4, "(B, C_l, H, W)")
        if l:
            _validate.same(f"feats[0] and feats[{l}]", feats[0], f, dims=(0, 2, 3), dtype=True)


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
    """Every pixel a proxy, when the (L, B, HW, HW) logits fit."""
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


def _fake(feats, proxies, reduction, eps, block_rows, grad_proxies):
    check_args(feats, proxies, reduction, eps, block_rows)
    f = feats[0]
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    return (
        f.new_empty(()),
        f.new_empty((len(feats), f.shape[0], f.shape[2]), dtype=acc),
        [p.new_empty(p.shape) for p in proxies] if grad_proxies else [],
    )


def _fake_backward(grad_loss, feats, proxies, lse, reduction, eps, block_rows, need_grad_feats, need_grad_proxies):
    check_backward_args(grad_loss, feats, proxies, lse, reduction, eps, block_rows)
    return (
        [f.new_empty(f.shape) for f in feats] if need_grad_feats else [],
        [p.new_empty(p.shape) for p in proxies] if need_grad_proxies else [],
    )


def _setup_context(ctx, inputs, output):
    feats, proxies, reduction, eps, rows, _ = inputs
    ctx.save_for_backward(*feats, *proxies, output[1], *output[2])
    ctx.params = (reduction, eps, rows)
    ctx.wants = ([f.requires_grad for f in feats], [p.requires_grad for p in proxies])
    ctx.mark_non_differentiable(output[1], *output[2])


def _backward(backward_op):
    def backward(ctx, grad_loss, _grad_lse, _grad_grads):
        want_f, want_p = ctx.wants
        L = len(want_f)
        saved = ctx.saved_tensors
        feats, proxies, lse, unit_grads = saved[:L], saved[L : 2 * L], saved[2 * L], saved[2 * L + 1 :]
        need_f, need_p = any(want_f), any(want_p) and not unit_grads
        grad_f, grad_p = [None] * L, [None] * L
        if need_f or need_p:
            gf, gp = backward_op(grad_loss, feats, proxies, lse, *ctx.params, need_f, need_p)
            grad_f = [g if w else None for g, w in zip(gf, want_f)] if need_f else grad_f
            grad_p = [g if w else None for g, w in zip(gp, want_p)] if need_p else grad_p
        if unit_grads:  # formed in forward for grad_loss = 1
            grad_p = [grad_loss * g if w else None for g, w in zip(unit_grads, want_p)]
        return grad_f, grad_p, None, None, None, None

    return backward


register(OP, fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward)
