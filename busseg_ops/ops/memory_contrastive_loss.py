"""PH-Net ops (SPEC §3–§6): patch-entropy hardness, adaptive patch cutmix, the confidence- and
entropy-filtered unsupervised losses, rigorous sampling of reliable hard pixels and the streaming
memory contrastive loss. Public functions, fake kernels and autograd."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _validate, reference
from .backends import selected_backend

_ops = torch.ops.busseg


# ---- §3 patch-entropy hardness ---------------------------------------------------------------


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    for e in v:
        _validate.integer(name, e, minimum=1)
    return int(v[0]), int(v[1])


def patch_size_of(shape_hw: Sequence[int], num_patches=None, patch_size=None) -> tuple[int, int]:
    """(h, w) of one patch of an H×W map cut into num_patches² patches or of patch_size pixels."""
    if (num_patches is None) == (patch_size is None):
        raise ValueError(
            "give exactly one of num_patches and patch_size, got "
            f"num_patches={num_patches!r}, patch_size={patch_size!r}"
        )
    H, W = shape_hw
    if num_patches is not None:
        nh, nw = _pair("num_patches", num_patches)
        if H % nh or W % nw:
            raise ValueError(f"num_patches {nh}×{nw} does not divide the map size {H}×{W}")
        return H // nh, W // nw
    ph, pw = _pair("patch_size", patch_size)
    if H % ph or W % pw:
        raise ValueError(f"patch_size {ph}×{pw} does not divide the map size {H}×{W}")
    return ph, pw


def patch_entropy_hardness(
    x: torch.Tensor, num_patches=None, patch_size=None, from_logits: bool = False, eps: float = 1e-10
) -> torch.Tensor:
    """PH-Net Eq. 4: the mean normalised pixel entropy of every patch, in [0, 1].

    ``x`` (B, K, H, W) class probabilities, or logits with ``from_logits=True`` (softmax fused).
    Exactly one of ``num_patches`` (N: an N×N grid, or (Nh, Nw)) and ``patch_size`` ((h, w) or
    an int). Returns (B, Nh, Nw). Differentiable."""
    _validate.tensor("x", x, 4, "(B, K, H, W)")
    if x.shape[1] < 2:
        raise ValueError(f"x needs K >= 2 classes (the entropy is divided by log K), got {x.shape[1]}")
    ph, pw = patch_size_of(x.shape[2:], num_patches, patch_size)
    backend = selected_backend(x.device)
    if backend == "reference":
        return reference.patch_entropy_hardness(x, ph, pw, from_logits, eps)
    op = _ops.patch_entropy_hardness_forward_triton if backend == "triton" else _ops.patch_entropy_hardness_forward
    return op(x, ph, pw, bool(from_logits), float(eps))


@torch.library.register_fake("busseg::patch_entropy_hardness_forward")
def _fake_hardness(x, patch_h, patch_w, from_logits, eps):
    return x.new_empty(x.shape[0], x.shape[2] // patch_h, x.shape[3] // patch_w)


@torch.library.register_fake("busseg::patch_entropy_hardness_backward")
def _fake_hardness_backward(grad, x, patch_h, patch_w, from_logits, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def register_hardness_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.params = inputs[1:]

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (backward_op(grad, x, *ctx.params),) + (None,) * 4

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


register_hardness_autograd("busseg::patch_entropy_hardness_forward", _ops.patch_entropy_hardness_backward)


# ---- §4 adaptive patch cutmix ----------------------------------------------------------------


def shield_count(beta: float, progress: float, n_patches: int) -> int:
    """PH-Net Eq. 5: k = floor(β · t/T · N²) hardest patches shielded; ``progress`` = t/T in
    [0, 1], ``n_patches`` = N² (all patches of an image)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress (t/T) must be in [0, 1], got {progress}")
    _validate.integer("n_patches", n_patches, minimum=1)
    return int(math.floor(beta * progress * n_patches + 1e-9))


def _uniform(shape, generator, device):
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def cutmix_patch_mask(
    hardness: torch.Tensor, shield_count: int, mix_range=(0.1, 0.5), generator: torch.Generator | None = None
) -> torch.Tensor:
    """The random part of §4 alone: (B, Nh, Nw) bool, True = kept. Per image, the ``shield_count``
    hardest patches are kept; n = round(U(mix_range)·N²) (capped at N² − k) of the others, chosen
    uniformly, are marked for replacement. Vectorised over the batch."""
    B, Nh, Nw = hardness.shape
    total = Nh * Nw
    device = hardness.device
    lo, hi = mix_range
    n = torch.floor((lo + (hi - lo) * _uniform((B,), generator, device)) * total + 0.5).long()
    n = n.clamp(max=total - shield_count)
    keys = _uniform((B, total), generator, device)
    if shield_count > 0:
        hardest = hardness.detach().flatten(1).argsort(dim=1, descending=True, stable=True)[:, :shield_count]
        keys.scatter_(1, hardest, 2.0)  # never among the n smallest keys
    order = keys.argsort(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(total, device=device).expand(B, -1))
    return (rank >= n[:, None]).view(B, Nh, Nw)


def adaptive_patch_cutmix(
    tensors: Sequence[torch.Tensor],
    hardness: torch.Tensor,
    shield_count: int,
    mix_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
):
    """PH-Net Eq. 5–7 (SPEC §4). ``tensors``: (B, ..., H, W) tensors mixed with one mask (image,
    pseudo-label, confidence, …); ``hardness`` (B, Nh, Nw). Returns (mixed tensors, patch_mask)
    with patch_mask (B, Nh, Nw) bool, True = kept from the own image, False = taken from image
    (b+1) mod B. One fused gather over all tensors. B = 1 returns copies and a mask of ones."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise TypeError("tensors must be a non-empty list of tensors")
    _validate.tensor("hardness", hardness, 3, "(B, Nh, Nw)")
    B, Nh, Nw = hardness.shape
    for i, t in enumerate(tensors):
        _validate.tensor(f"tensors[{i}]", t, floating=False)
        if t.dim() < 3:
            raise ValueError(f"tensors[{i}] must be (B, ..., H, W), got shape {tuple(t.shape)}")
        if t.shape[0] != B or t.shape[-2:] != tensors[0].shape[-2:]:
            raise ValueError(
                f"tensors[{i}] {tuple(t.shape)} must share B={B} and H×W with tensors[0] {tuple(tensors[0].shape)}"
            )
        if t.device != hardness.device:
            raise ValueError(f"tensors[{i}] and hardness must be on the same device")
    H, W = tensors[0].shape[-2:]
    if H % Nh or W % Nw:
        raise ValueError(f"the hardness grid {Nh}×{Nw} does not divide the map size {H}×{W}")
    _validate.integer("shield_count", shield_count, minimum=0)
    if shield_count > Nh * Nw:
        raise ValueError(f"shield_count must be <= N² = {Nh * Nw}, got {shield_count}")
    lo, hi = mix_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mix_range must satisfy 0 <= low <= high <= 1, got {mix_range}")
    if B == 1:
        return [t.clone() for t in tensors], torch.ones_like(hardness, dtype=torch.bool)
    mask = cutmix_patch_mask(hardness, shield_count, mix_range, generator)
    backend = selected_backend(hardness.device, supported=("reference", "cpu", "cuda"))
    if backend == "reference":
        return reference.patch_cutmix(list(tensors), mask), mask
    return list(_ops.patch_cutmix(list(tensors), mask)), mask


@torch.library.register_fake("busseg::patch_cutmix")
def _fake_cutmix(tensors, patch_mask):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


# ---- §5 filtered unsupervised losses ---------------------------------------------------------


def _check_loss_inputs(logits, target, teacher_prob):
    _validate.tensor("logits", logits, 4, "(B, K, H, W)")
    _validate.tensor("teacher_prob", teacher_prob, 4, "(B, K, H, W)")
    _validate.tensor("target", target, 3, "(B, H, W)", floating=False)
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64, got {target.dtype}")
    _validate.same("logits and teacher_prob", logits, teacher_prob, dims=(0, 1, 2, 3))
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must be (B, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(target.shape)}"
        )


def confidence_masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_prob: torch.Tensor,
    threshold: float = 0.9,
    ignore_index: int = 255,
) -> torch.Tensor:
    """PH-Net Eq. 8–9: per-pixel CE(logits, target), counted where the teacher's max probability
    is ≥ ``threshold``, averaged over all non-ignored pixels (UniMatch/PH-Net convention: filtered
    pixels count as zero). A plain PyTorch composition: CE and a mask fuse well already."""
    _check_loss_inputs(logits, target, teacher_prob)
    keep = teacher_prob.detach().amax(1) >= threshold
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).sum().clamp_min(1)
    return (ce * keep).sum() / valid


def entropy_filtered_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_prob: torch.Tensor,
    drop_percent: float = 20.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """RA-BUSSeg's variant: drop the floor(p%) most uncertain non-ignored pixels (highest teacher
    entropy, batch-wide) and average CE over the rest. Plain PyTorch (one topk)."""
    _check_loss_inputs(logits, target, teacher_prob)
    if not 0.0 <= drop_percent < 100.0:
        raise ValueError(f"drop_percent must be in [0, 100), got {drop_percent}")
    p = teacher_prob.detach()
    entropy = -(p * torch.log(p + 1e-10)).sum(1).flatten()
    valid = (target != ignore_index).flatten()
    drop = int(math.floor(drop_percent / 100.0 * int(valid.sum())))
    keep = valid.clone()
    if drop > 0:
        keep[entropy.masked_fill(~valid, float("-inf")).topk(drop).indices] = False
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    return (ce * keep).sum() / keep.sum().clamp_min(1)


# ---- §6 rigorous sampling --------------------------------------------------------------------


class ReliableHardPixels(NamedTuple):
    mask: torch.Tensor  # (B, h, w) bool: reliable and inside a top-k hard patch (Eq. 10–13)
    labels: torch.Tensor  # (B, h, w) int64 pseudo-label at the feature grid
    hard: torch.Tensor  # (B, h, w) bool: inside one of the k hardest patches


def reliable_hard_pixels(
    pseudo_label: torch.Tensor, teacher_argmax: torch.Tensor, hardness: torch.Tensor, k: int, feat_hw: Sequence[int]
) -> ReliableHardPixels:
    """Eq. 10–13 at the feature grid: a pixel is reliable when the (mixed) pseudo-label equals the
    teacher's argmax on the mixed image; anchors come only from the ``k`` hardest patches. Labels
    are resized with nearest. Z_c = features[mask & (labels == c)], Z_c⁻ = features[mask &
    (labels != c)]."""
    _validate.tensor("pseudo_label", pseudo_label, 3, "(B, H, W)", floating=False)
    _validate.tensor("teacher_argmax", teacher_argmax, 3, "(B, H, W)", floating=False)
    _validate.tensor("hardness", hardness, 3, "(B, Nh, Nw)")
    _validate.same("pseudo_label and teacher_argmax", pseudo_label, teacher_argmax, dims=(0, 1, 2))
    _validate.same("pseudo_label and hardness", pseudo_label, hardness, dims=(0,))
    n = hardness.shape[1] * hardness.shape[2]
    _validate.integer("k", k, minimum=0)
    if k > n:
        raise ValueError(f"k must be <= the number of patches {n}, got {k}")
    h, w = _pair("feat_hw", feat_hw)
    size = (h, w)
    labels = F.interpolate(pseudo_label[:, None].double(), size=size, mode="nearest")[:, 0].long()
    argmax = F.interpolate(teacher_argmax[:, None].double(), size=size, mode="nearest")[:, 0].long()
    top = hardness.detach().flatten(1).topk(k, 1).indices
    hard = torch.zeros_like(hardness, dtype=torch.bool).flatten(1).scatter_(1, top, True)
    hard = F.interpolate(hard.view_as(hardness)[:, None].float(), size=size, mode="nearest")[:, 0] > 0
    return ReliableHardPixels((labels == argmax) & hard, labels, hard)


# ---- §6 streaming memory contrastive loss ----------------------------------------------------


def _positives(positives, dim: int, like: torch.Tensor):
    """(K, D) tensor, or a sequence of K (D,) tensors / None (ClassMemoryBank.means()) →
    ((K, D) tensor, (K,) bool has_positive)."""
    if isinstance(positives, torch.Tensor):
        _validate.tensor("positives", positives, 2, "(K, D)")
        return positives.detach(), torch.ones(positives.shape[0], dtype=torch.bool, device=positives.device)
    if isinstance(positives, str) or not isinstance(positives, Sequence) or len(positives) == 0:
        raise TypeError("positives must be a (K, D) tensor or a non-empty list of (D,) tensors / None")
    rows, present = [], []
    for c, p in enumerate(positives):
        if p is None:
            rows.append(like.new_zeros(dim))
            present.append(False)
        else:
            _validate.tensor(f"positives[{c}]", p, 1, "(D,)")
            rows.append(p.detach().to(like.dtype))
            present.append(True)
    return torch.stack(rows), torch.tensor(present, device=like.device)


def memory_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    positives,
    temperature: float = 0.5,
) -> torch.Tensor:
    """PH-Net Eq. 15 (InfoNCE, SPEC §6) with cosine similarity, streamed over blocks of negatives:
    memory O(N + N⁻), never O(N·N⁻).

    ``anchors`` (N, D) with ``anchor_labels`` (N,) int64 (labels outside [0, K) are ignored);
    ``negatives`` (N⁻, D) with ``negative_labels`` (N⁻,) — a negative counts for anchors of every
    other class; ``positives`` (K, D) class centres (e.g. ``ClassMemoryBank.means()``, where a
    None entry marks a class without a positive). A class without anchors or positive is skipped;
    when none is left the loss is 0 (and still backpropagates). Gradients flow to anchors, to
    negatives only when they require grad, never to positives."""
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
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    backend = selected_backend(anchors.device)
    args = (anchors, anchor_labels, negatives, negative_labels, pos, has_positive, float(temperature))
    if backend == "reference":
        return reference.memory_contrastive_loss(*args)
    op = _ops.memory_contrastive_forward_triton if backend == "triton" else _ops.memory_contrastive_forward
    return op(*args)[0]


@torch.library.register_fake("busseg::memory_contrastive_forward")
def _fake_contrastive(anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature):
    return anchors.new_empty(()), anchors.new_empty(anchors.shape[0])


@torch.library.register_fake("busseg::memory_contrastive_backward")
def _fake_contrastive_backward(
    grad_loss,
    anchors,
    anchor_labels,
    negatives,
    negative_labels,
    positives,
    has_positive,
    lse,
    temperature,
    need_grad_negatives,
):
    return (
        torch.empty_like(anchors, memory_format=torch.contiguous_format),
        torch.empty_like(negatives, memory_format=torch.contiguous_format)
        if need_grad_negatives
        else anchors.new_empty(0),
    )


def register_contrastive_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6], output[1])
        ctx.temperature = inputs[6]
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_loss, _grad_lse):
        *inputs, lse = ctx.saved_tensors
        need_neg = ctx.needs_input_grad[2]
        grad_a, grad_n = backward_op(grad_loss, *inputs, lse, ctx.temperature, need_neg)
        return grad_a, None, grad_n if need_neg else None, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


register_contrastive_autograd("busseg::memory_contrastive_forward", _ops.memory_contrastive_backward)
