"""entropy_filtered_cross_entropy: RA-BUSSeg's unsupervised loss, which drops the most uncertain
pixels by the teacher's entropy (the U2PL-style filter of its training)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .confidence_masked_cross_entropy import check_pixel_loss_inputs, real_in


def entropy_filtered_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_prob: torch.Tensor,
    drop_percent: float = 20.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Drop the floor(p%) most uncertain non-ignored pixels (highest teacher entropy, batch-wide)
    and average CE over the rest. Plain PyTorch (one topk); the entropies of float16 / bfloat16
    probabilities in float32 (in float16 the 1e-10 vanishes: log 0)."""
    check_pixel_loss_inputs(logits, target, teacher_prob, ignore_index)
    drop_percent = real_in("drop_percent", drop_percent, 0.0, 100.0, high_open=True)
    p = teacher_prob.detach().to(torch.promote_types(teacher_prob.dtype, torch.float32))
    entropy = -(p * torch.log(p + 1e-10)).sum(1).flatten()
    valid = (target != ignore_index).flatten()
    drop = int(math.floor(drop_percent / 100.0 * int(valid.sum())))
    keep = valid.clone()
    if drop > 0:
        keep[entropy.masked_fill(~valid, float("-inf")).topk(drop).indices] = False
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    return (ce * keep).sum() / keep.sum().clamp_min(1)
