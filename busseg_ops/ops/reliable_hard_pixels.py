"""reliable_hard_pixels: PH-Net's rigorous sampling of contrastive anchors (Eq. 10-13)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _validate
from .patch_entropy_hardness import pair


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
    (labels != c)]. ``pseudo_label`` and ``teacher_argmax`` are integer tensors (float ones
    would be truncated)."""
    _validate.tensor("pseudo_label", pseudo_label, 3, "(B, H, W)", floating=False)
    _validate.integer_tensor("pseudo_label", pseudo_label)
    _validate.tensor("teacher_argmax", teacher_argmax, 3, "(B, H, W)", floating=False)
    _validate.integer_tensor("teacher_argmax", teacher_argmax)
    _validate.tensor("hardness", hardness, 3, "(B, Nh, Nw)")
    _validate.same("pseudo_label and teacher_argmax", pseudo_label, teacher_argmax, dims=(0, 1, 2))
    _validate.same("pseudo_label and hardness", pseudo_label, hardness, dims=(0,))
    n = hardness.shape[1] * hardness.shape[2]
    _validate.integer("k", k, minimum=0)
    if k > n:
        raise ValueError(f"k must be <= the number of patches {n}, got {k}")
    h, w = pair("feat_hw", feat_hw)
    size = (h, w)
    labels = F.interpolate(pseudo_label[:, None].double(), size=size, mode="nearest")[:, 0].long()
    argmax = F.interpolate(teacher_argmax[:, None].double(), size=size, mode="nearest")[:, 0].long()
    top = hardness.detach().flatten(1).topk(k, 1).indices
    hard = torch.zeros_like(hardness, dtype=torch.bool).flatten(1).scatter_(1, top, True)
    hard = F.interpolate(hard.view_as(hardness)[:, None].float(), size=size, mode="nearest")[:, 0] > 0
    return ReliableHardPixels((labels == argmax) & hard, labels, hard)
