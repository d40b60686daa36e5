"""patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md) in plain PyTorch: the executable form of the
contract and the test oracle."""

import math

import torch


def patch_entropy_hardness(x, patch_h, patch_w, from_logits, eps):
    """(B, K, H, W) probabilities (or logits) → (B, H/patch_h, W/patch_w) mean normalised entropy,
    as the native op ``busseg::patch_entropy_hardness``; autograd by PyTorch."""
    B, K, H, W = x.shape
    p = x.softmax(1) if from_logits else x
    entropy = -(p * torch.log(p + eps)).sum(1) / math.log(K)
    return entropy.view(B, H // patch_h, patch_h, W // patch_w, patch_w).mean((2, 4))
