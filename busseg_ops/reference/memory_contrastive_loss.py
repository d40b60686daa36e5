"""PH-Net ops (SPEC §3–§6) in plain PyTorch: the executable form of the spec and the test oracle.
The contrastive loss here materialises the (N, N⁻) similarity matrix (fine for tests, not for
training sizes)."""

import math

import torch
import torch.nn.functional as F


def patch_entropy_hardness(x, patch_h, patch_w, from_logits, eps):
    """(B, K, H, W) probabilities (or logits) → (B, H/patch_h, W/patch_w) mean normalised entropy."""
    B, K, H, W = x.shape
    p = x.softmax(1) if from_logits else x
    entropy = -(p * torch.log(p + eps)).sum(1) / math.log(K)
    return entropy.view(B, H // patch_h, patch_h, W // patch_w, patch_w).mean((2, 4))


def patch_cutmix(tensors, patch_mask):
    """Mix every tensor (B, ..., H, W) with the next image's, (b+1) mod B, where patch_mask is False."""
    out = []
    for t in tensors:
        H, W = t.shape[-2:]
        Nh, Nw = patch_mask.shape[1:]
        keep = patch_mask.repeat_interleave(H // Nh, 1).repeat_interleave(W // Nw, 2)
        keep = keep.view(keep.shape[0], *([1] * (t.dim() - 3)), H, W)
        out.append(torch.where(keep, t, t.roll(-1, 0)))
    return out


def memory_contrastive_loss(anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature):
    """SPEC §6 with the whole (N, N⁻) logit matrix; autograd by PyTorch. Anchors whose label is
    outside [0, K) are ignored; a class counts when it has anchors and a positive."""
    K = positives.shape[0]
    a = F.normalize(anchors, dim=1)
    n = F.normalize(negatives, dim=1)
    p = F.normalize(positives.detach(), dim=1)
    inside = (anchor_labels >= 0) & (anchor_labels < K)
    lab = anchor_labels.clamp(0, K - 1)
    valid = inside & has_positive[lab]
    pos = (a * p[lab]).sum(1) / temperature
    logits = a @ n.t() / temperature
    logits = logits.masked_fill(anchor_labels[:, None] == negative_labels[None, :], float("-inf"))
    lse = torch.logsumexp(torch.cat([pos[:, None], logits], 1), 1)
    counts = torch.zeros(K, dtype=a.dtype, device=a.device).index_add_(0, lab, valid.to(a.dtype))
    classes = (counts > 0).sum()
    weight = torch.where(valid, 1.0 / (counts[lab] * classes.clamp_min(1)), 0.0)
    return (weight * torch.where(valid, lse - pos, 0.0)).sum()
