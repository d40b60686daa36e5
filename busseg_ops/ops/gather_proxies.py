"""gather_proxies: the proxy features of RA-BUSSeg's cross-layer relation alignment, gathered from
a feature map at pixel indices (differentiable)."""

from __future__ import annotations

import torch

from .. import _validate


def gather_proxies(feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Proxy features (B, M, C) of ``feat`` (B, C, H, W) at pixel indices ``idx`` (B, M) int64;
    keeps the gradient to ``feat``."""
    _validate.tensor("feat", feat, 4, "(B, C, H, W)")
    B, C, H, W = feat.shape
    _validate.tensor("idx", idx, 2, "(B, M)", floating=False)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    _validate.same("feat and idx", feat, idx, dims=(0,))
    _validate.in_range("idx", idx, H * W, "pixel indices (H*W)")
    return feat.flatten(2).gather(2, idx[:, None, :].expand(B, C, idx.shape[1])).transpose(1, 2)
