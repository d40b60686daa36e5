"""adaptive_patch_cutmix (PH-Net Eq. 5-7; docs/ops.md) in plain PyTorch: the random mask from its
uniforms and the gather."""

import torch


def cutmix_patch_mask(hardness, uniforms, shield_count, low, high):
    """(B, Nh, Nw) bool, True = kept (the native op ``busseg::cutmix_patch_mask``). ``uniforms``
    (B, 1 + Nh*Nw), read as float32: column 0 draws the share, n = round(U(low, high) * Nh*Nw) (float32
    arithmetic, capped to [0, Nh*Nw - shield_count]); the rest are the patches' keys. The
    ``shield_count`` hardest patches (hardness descending, NaN first, ties to the smaller index) are
    kept; of the others, the n with the smallest keys (NaN last, ties to the smaller index) are
    replaced."""
    B, Nh, Nw = hardness.shape
    total = Nh * Nw
    uniforms = uniforms.float()
    share = uniforms[:, 0]
    n = torch.floor((low + (high - low) * share) * total + 0.5).nan_to_num(0.0)
    n = n.clamp(0, total - shield_count).long().clamp(max=total - shield_count)
    hardest = hardness.flatten(1).argsort(dim=1, descending=True, stable=True)[:, :shield_count]
    shielded = torch.zeros(B, total, dtype=torch.bool, device=hardness.device).scatter_(1, hardest, True)
    # by key, then (stably) unshielded first: the order (shielded, key, index)
    order = uniforms[:, 1:].argsort(dim=1, stable=True)
    order = order.gather(1, shielded.gather(1, order).int().argsort(dim=1, stable=True))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(total, device=order.device).expand(B, -1))
    return (rank >= n[:, None]).view(B, Nh, Nw)


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
