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

# ---- contract: the arguments of busseg::memory_contrastive_loss and its backward ---------------
# Checked by the public function, the fake kernels and the Triton launchers alike; csrc/
# memory_contrastive_loss/checks.h guards direct calls of the C++ kernels with the same rules.


def check_args(
    anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature, allow_empty=False
) -> None:
    """``anchors`` (N, D), ``negatives`` (N-, D) and ``positives`` (K >= 1, D) of one floating dtype,
    D >= 1 (D = 0 only with ``allow_empty``: the public function refuses it); int64
    ``anchor_labels`` (N,) and ``negative_labels`` (N-,); bool ``has_positive`` (K,); all on one
    device; ``temperature`` a finite float > 0."""
    _validate.tensor("anchors", anchors, 2, "(N, D)", allow_empty=True)
    D = anchors.shape[1]
    if D == 0 and not allow_empty:
        raise ValueError("anchors is empty: feature dimension D = 0")
    _validate.tensor("negatives", negatives, 2, "(N-, D)", allow_empty=True)
    _validate.tensor("positives", positives, 2, "(K, D)", allow_empty=True)
    if positives.shape[0] == 0:
        raise ValueError(f"positives must be (K, D) with K >= 1, got {tuple(positives.shape)}")
    _validate.tensor("anchor_labels", anchor_labels, 1, "(N,)", floating=False, allow_empty=True)
    _validate.tensor("negative_labels", negative_labels, 1, "(N-,)", floating=False, allow_empty=True)
    _validate.tensor("has_positive", has_positive, 1, "(K,)", floating=False)
    _validate.one_device(
        OP.name,
        anchors=anchors,
        anchor_labels=anchor_labels,
        negatives=negatives,
        negative_labels=negative_labels,
        positives=positives,
        has_positive=has_positive,
    )
    for name, t, dtype in (
        ("anchor_labels", anchor_labels, torch.int64),
        ("negative_labels", negative_labels, torch.int64),
        ("has_positive", has_positive, torch.bool),
    ):
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if negatives.shape[1] != D:
        raise ValueError(f"anchors and negatives must share D, got {D} and {negatives.shape[1]}")
    if positives.shape[1] != D:
        raise ValueError(f"positives must be (K, D) with D = {D}, got {tuple(positives.shape)}")
    for name, t, rows, of in (
        ("anchor_labels", anchor_labels, anchors.shape[0], "N"),
        ("negative_labels", negative_labels, negatives.shape[0], "N-"),
        ("has_positive", has_positive, positives.shape[0], "K"),
    ):
        if t.shape[0] != rows:
            raise ValueError(f"{name} must be ({of},) with {of} = {rows}, got {tuple(t.shape)}")
    _validate.same("anchors and negatives", anchors, negatives, dtype=True)
    _validate.same("anchors and positives", anchors, positives, dtype=True)
    _validate.real("temperature", temperature, positive=True)


def check_backward_args(
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
) -> None:
    """The forward's arguments, ``lse`` (N,), the scalar ``grad_loss`` and ``weighted_negatives``
    (N, D), or (0,) when forward saved none: floating, on the anchors' device."""
    check_args(
        anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature, allow_empty=True
    )
    _validate.tensor("lse", lse, 1, "(N,)", allow_empty=True)
    if lse.shape[0] != anchors.shape[0]:
        raise ValueError(f"lse must be (N,) with N = {anchors.shape[0]}, got {tuple(lse.shape)}")
    _validate.tensor("grad_loss", grad_loss)
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must be a scalar, got shape {tuple(grad_loss.shape)}")
    _validate.tensor("weighted_negatives", weighted_negatives, allow_empty=True)
    if tuple(weighted_negatives.shape) not in ((0,), tuple(anchors.shape)):
        raise ValueError(
            f"weighted_negatives must be (N, D) = {tuple(anchors.shape)} or (0,), got {tuple(weighted_negatives.shape)}"
        )
    _validate.one_device(
        f"{OP.name}_backward", anchors=anchors, lse=lse, grad_loss=grad_loss, weighted_negatives=weighted_negatives
    )


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
    pos, has_positive = _positives(positives, anchors.shape[1], anchors)
    pos = pos.to(anchors.dtype)
    check_args(anchors, anchor_labels, negatives, negative_labels, pos, has_positive, temperature)
    temperature = float(temperature)
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
    check_args(
        anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature, allow_empty=True
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
