"""adjacent_relation_propagation (RA-BUSSeg ARP; docs/ops.md) in plain PyTorch, one shifted copy
of the features per tap (never the unfolded (B, C*k*k, HW) stack)."""

import torch
import torch.nn.functional as F


def adjacent_relation_propagation(feat, value, kernel_size, dilation, scale, valid_padding):
    """Returns ``out`` (B, K, H, W) and ``weights`` (B, k*k, H, W), as the native op
    ``busseg::adjacent_relation_propagation``; autograd by PyTorch."""
    B, _, H, W = feat.shape
    pad = dilation * (kernel_size // 2)
    feat_p = F.pad(feat, (pad, pad, pad, pad))
    value_p = F.pad(value, (pad, pad, pad, pad))
    inside_p = F.pad(feat.new_ones(1, 1, H, W, dtype=torch.bool), (pad, pad, pad, pad))
    affinities, inside, values = [], [], []
    for t in range(kernel_size * kernel_size):  # row-major taps: dy outer, dx inner
        y0 = (t // kernel_size) * dilation
        x0 = (t % kernel_size) * dilation
        affinities.append(scale * (feat * feat_p[:, :, y0 : y0 + H, x0 : x0 + W]).sum(1))
        inside.append(inside_p[:, 0, y0 : y0 + H, x0 : x0 + W])
        values.append(value_p[:, :, y0 : y0 + H, x0 : x0 + W])
    affinity = torch.stack(affinities, 1)  # (B, taps, H, W)
    if valid_padding:
        affinity = affinity.masked_fill(~torch.stack(inside, 1), float("-inf"))
    weights = affinity.softmax(1)
    out = sum(weights[:, t : t + 1] * v for t, v in enumerate(values))
    return out, weights
