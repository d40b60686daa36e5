"""confidence_masked_cross_entropy: PH-Net's confidence-filtered unsupervised loss (Eq. 8-9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate


def check_pixel_loss_inputs(logits, target, teacher_prob, ignore_index) -> None:
    """logits and teacher_prob (B, K, H, W) floating, target (B, H, W) int64, ignore_index an int."""
    _validate.integer("ignore_index", ignore_index, minimum=-(2**63))
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


def real_in(name: str, v, low: float, high: float, *, high_open: bool = False) -> float:
    """A finite real number (int or float, not bool) in [low, high] (or [low, high))."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if not (low <= v < high if high_open else low <= v <= high):  # NaN fails both
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {v}")
    return float(v)


def confidence_masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_prob: torch.Tensor,
    threshold: float = 0.9,
    ignore_index: int = 255,
) -> torch.Tensor:
    """PH-Net Eq. 8-9: per-pixel CE(logits, target), counted where the teacher's max probability
    is ≥ ``threshold``, averaged over all non-ignored pixels (UniMatch/PH-Net convention: filtered
    pixels count as zero). ``threshold`` is a probability in [0, 1] (NaN, inf or 2 would keep no
    pixel: a loss of 0). A plain PyTorch composition: CE and a mask fuse well already."""
    check_pixel_loss_inputs(logits, target, teacher_prob, ignore_index)
    threshold = real_in("threshold", threshold, 0.0, 1.0)
    keep = teacher_prob.detach().amax(1) >= threshold
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).sum().clamp_min(1)
    return (ce * keep).sum() / valid
