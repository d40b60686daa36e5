"""adaptive_patch_cutmix's gather (PH-Net Eq. 6-7; docs/ops.md) in plain PyTorch."""

import torch


def adaptive_patch_cutmix(tensors, patch_mask):
    """Mix every tensor (B, ..., H, W) with the next image's, (b+1) mod B, where patch_mask is False
    (the native op ``busseg::adaptive_patch_cutmix``)."""
    out = []
    for t in tensors:
        H, W = t.shape[-2:]
        Nh, Nw = patch_mask.shape[1:]
        keep = patch_mask.repeat_interleave(H // Nh, 1).repeat_interleave(W // Nw, 2)
        keep = keep.view(keep.shape[0], *([1] * (t.dim() - 3)), H, W)
        out.append(torch.where(keep, t, t.roll(-1, 0)))
    return out
