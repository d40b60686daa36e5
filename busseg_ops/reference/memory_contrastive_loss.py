"""memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md) in plain PyTorch: the executable form of
the contract and the test oracle. It materialises the (N, N⁻) similarity matrix (fine for tests,
not for training sizes)."""

import torch
import torch.nn.functional as F


def memory_contrastive_loss(
    anchors, anchor_labels, negatives, negative_labels, positives, has_positive, temperature, save_weighted_negatives
):
    """(loss, lse, weighted_negatives) as the native op ``busseg::memory_contrastive_loss``, with
    the whole (N, N⁻) logit matrix; autograd by PyTorch. Anchors whose label is outside [0, K) are
    ignored; a class counts when it has anchors and a positive. lse (N,) is each anchor's
    log-sum-exp over its positive and the negatives of other classes; weighted_negatives (N, D),
    with save_weighted_negatives, Σ_j π_ij n̂_j over those negatives (π: the softmax weights of
    that log-sum-exp), zero for anchors without loss; else empty."""
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
    loss = (weight * torch.where(valid, lse - pos, 0.0)).sum()
    if not save_weighted_negatives:
        return loss, lse, anchors.new_empty(0)
    pi = (logits - lse[:, None]).exp()
    return loss, lse, torch.where(valid[:, None], pi @ n, 0.0).detach()
