"""memory_contrastive_loss: PH-Net's hard-patch contrastive loss with the class memory bank
(Eq. 15), streamed. Public function, fake kernels and autograd of
``busseg::memory_contrastive_loss``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _validate
from ..backends import Op, autocast_inputs, dispatch, register
from ..reference.memory_contrastive_loss import memory_contrastive_loss as _reference

# Under autocast a loss in float32, as torch's own losses.
OP = Op("memory_contrastive_loss", reference=_reference, autocast="float32")


def _positives(positives, dim: int, like: torch.Tensor):
    """(K, D) tensor, or a sequence of K (D,) tensors / None (ClassMemoryBank.means()) →
    ((K, D) tensor, (K,) bool has_positive)."""
    if isinstance(positives, torch.Tensor):
        _validate.tensor("positives", positives, 2, "(K, D)")
        return positives.detach(), torch.ones(positives.shape[0], dtype=torch.bool, device=positives.device)
    if isinstance(positives, str) or not isinstance(positives, Sequence) or len(positives) == 0:
        raise TypeError("positives must be a (K, D) tensor or a non-empty list of (D,) tensors / None")
    rows = []
    # built on the device (a fill per missing class), not copied from a host list: no host-to-device
    # copy in the call, which a CUDA graph could not capture
    has_positive = like.new_ones(len(positives), dtype=torch.bool)
    for c, p in enumerate(positives):
        if p is None:
            rows.append(like.new_zeros(dim))
            has_positive[c] = False
        else:
            _validate.tensor(f"positives[{c}]", p, 1, "(D,)")
            rows.append(p.detach().to(like.dtype))
    return torch.stack(rows), has_positive


def memory_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    positives,
    temperature: float = 0.5,
) -> torch.Tensor:
    """PH-Net Eq. 15 (InfoNCE; docs/ops.md) with cosine similarity, streamed over blocks of
    negatives: memory O(N + N⁻), never O(N·N⁻). For an anchor z of class c::

        ℓ(z) = −log( e^{cos(z, z_c⁺)/τ} / (e^{cos(z, z_c⁺)/τ} + Σ_{z⁻ of class ≠ c} e^{cos(z, z⁻)/τ}) )

    and the loss is the mean over the classes that have anchors and a positive of the mean ℓ over
    that class's anchors.

    ``anchors`` (N, D) with ``anchor_labels`` (N,) int64 (labels outside [0, K) are ignored);
    ``negatives`` (N⁻, D) with ``negative_labels`` (N⁻,) — a negative counts for anchors of every
    other class; ``positives`` (K, D) class centres (e.g. ``ClassMemoryBank.means()``, where a
    None entry marks a class without a positive). A class without anchors or positive is skipped;
    when none is left the loss is 0 (and still backpropagates). Gradients flow to anchors, to
    negatives only when they require grad, never to positives. Every floating dtype;
    float16 / bfloat16 are computed in float32. Under torch.autocast the inputs are cast to
    float32 (the positives follow the anchors' dtype)."""
    anchors, negatives = autocast_inputs(OP, anchors, negatives)
    _validate.tensor("anchors", anchors, 2, "(N, D)", allow_empty=True)
    _validate.tensor("negatives", negatives, 2, "(N-, D)", allow_empty=True)
    _validate.tensor("anchor_labels", anchor_labels, 1, "(N,)", floating=False, allow_empty=True)
    _validate.tensor("negative_labels", negative_labels, 1, "(N-,)", floating=False, allow_empty=True)
    for name, t in (("anchor_labels", anchor_labels), ("negative_labels", negative_labels)):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
    D = anchors.shape[1]
    if D == 0:
        raise ValueError("anchors is empty: feature dimension D = 0")
    if negatives.shape[1] != D:
        raise ValueError(f"anchors and negatives must share D, got {D} and {negatives.shape[1]}")
    if anchor_labels.shape[0] != anchors.shape[0]:
        raise ValueError(f"anchor_labels must be (N,) with N = {anchors.shape[0]}, got {tuple(anchor_labels.shape)}")
    if negative_labels.shape[0] != negatives.shape[0]:
        raise ValueError(
            f"negative_labels must be (N-,) with N- = {negatives.shape[0]}, got {tuple(negative_labels.shape)}"
        )
    pos, has_positive = _positives(positives, D, anchors)
    if pos.shape[1] != D:
        raise ValueError(f"positives must be (K, D) with D = {D}, got {tuple(pos.shape)}")
    for name, t in (
        ("negatives", negatives),
        ("positives", pos),
        ("anchor_labels", anchor_labels),
        ("negative_labels", negative_labels),
    ):
        if t.device != anchors.device:
            raise ValueError(f"anchors and {name} must be on the same device")
    if negatives.dtype != anchors.dtype:
        raise TypeError(f"anchors and negatives must have the same dtype, got {anchors.dtype} and {negatives.dtype}")
    pos = pos.to(anchors.dtype)
    temperature = _validate.real("temperature", temperature, positive=True)
    # Forward saves Σ π n̂ for the anchors' gradient when that is the only one backward needs: the
    # backward then skips its pass over the tiles (with a negative gradient that pass runs anyway).
    save = torch.is_grad_enabled() and anchors.requires_grad and not negatives.requires_grad
    loss, _, _ = dispatch(OP, anchors.device)(
        anchors, anchor_labels, negatives, negative_labels, pos, has_positive, temperature, save
    )
    return loss


def _fake(
    anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature, save_weighted_negatives
):
    _validate.one_device(
        OP.name,
        anchors=anchors,
        anchor_labels=anchor_labels,
        negatives=negatives,
        negative_labels=negative_labels,
        positives=positives,
        has_positive=has_positive,
    )
    weighted_negatives = anchors.new_empty(anchors.shape if save_weighted_negatives else (0,))
    return anchors.new_empty(()), anchors.new_empty(anchors.shape[0]), weighted_negatives


def _fake_backward(
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
    need_grad_negatives,
):
    _validate.one_device(
        f"{OP.name}_backward",
        grad_loss=grad_loss,
        anchors=anchors,
        anchor_labels=anchor_labels,
        negatives=negatives,
        negative_labels=negative_labels,
        positives=positives,
        has_positive=has_positive,
        lse=lse,
        weighted_negatives=weighted_negatives,
    )
    return (
        torch.empty_like(anchors, memory_format=torch.contiguous_format),
        torch.empty_like(negatives, memory_format=torch.contiguous_format)
        if need_grad_negatives
        else anchors.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *output[1:])
    ctx.temperature = inputs[6]
    ctx.mark_non_differentiable(*output[1:])


def _backward(backward_op):
    def backward(ctx, grad_loss, _grad_lse, _grad_weighted_negatives):
        *inputs, lse, weighted_negatives = ctx.saved_tensors
        need_neg = ctx.needs_input_grad[2]
        grad_a, grad_n = backward_op(grad_loss, *inputs, lse, weighted_negatives, ctx.temperature, need_neg)
        return grad_a, None, grad_n if need_neg else None, None, None, None, None, None

    return backward


register(OP, fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward)
