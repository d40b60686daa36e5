"""RA-BUSSeg relation modules: thin nn.Module wrappers that do the upstream wiring (resizing,
detaching, index mapping) around the ``busseg_ops`` ops (ARP and CRA; their math is in docs/ops.md).
The ops are looked up on ``busseg_ops`` at call time, so a backend or a patched op is picked up without re-import."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import busseg_ops

from .deeplab import upsample


class AdjacentRelationPropagation(nn.Module):
    """ARP (docs/ops.md). ``forward(feat, logits, size=None)``: the logits are detached and resized
    (bilinear, align_corners=True) to the grid of ``feat`` (the relation projection ``proj``),
    propagated by :func:`busseg_ops.adjacent_relation_propagation`, and the result is resized to
    ``size`` (default: the grid of ``logits``, i.e. the decoder output). Gradient reaches ``feat``
    only. ``loss(...)`` adds upstream's CE with ``ignore_index``."""

    def __init__(self, kernel_size: int = 3, dilation: int = 1, scale: float | None = None, padding: str = "zeros"):
        super().__init__()
        self.kernel_size, self.dilation, self.scale, self.padding = kernel_size, dilation, scale, padding

    def forward(self, feat: torch.Tensor, logits: torch.Tensor, size=None) -> torch.Tensor:
        value = upsample(logits.detach(), feat.shape[-2:])
        out = busseg_ops.adjacent_relation_propagation(
            feat, value, self.kernel_size, self.dilation, self.scale, self.padding
        )
        return upsample(out, logits.shape[-2:] if size is None else size)

    def loss(self, feat, logits, target, ignore_index: int = 255, reduction: str = "mean"):
        out = self(feat, logits, target.shape[-2:])
        return F.cross_entropy(out, target, ignore_index=ignore_index, reduction=reduction)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}, padding={self.padding!r}"


class CrossLayerRelationAlignment(nn.Module):
    """CRA (docs/ops.md). ``forward(feats, proj, label=None, first=None, generator=None)`` → loss.

    - ``feats``: the four stage maps, shallow → deep; the deepest ``scales`` (2, 3 or 4; seed
      supplementary Table 4) take part.
    - ``label`` (B, H, W) ground truth or pseudo-label at any resolution: downsampled (nearest) to
      the grid of ``proj``; a random foreground pixel is the first proxy. Pixels equal to
      ``ignore_index`` count as background for that choice.
    - proxies are sampled on ``proj`` (no gradient), the indices mapped to each stage map's own
      grid (``map_proxy_indices``: stage 1 at stride 4, identity where the grid equals ``proj``'s),
      proxies gathered there (they keep their gradient);
    - the shallow maps are resized (bilinear, align_corners=True) to the deepest map's grid,
      detached when ``detach_shallow`` (upstream); the deepest map keeps its gradient.
    """

    def __init__(
        self,
        num_proxies: int = 64,
        scales: int = 4,
        strategy: str = "greedy",
        reduction: str = "mean",
        detach_shallow: bool = True,
        ignore_index: int = 255,
    ):
        super().__init__()
        if scales not in (2, 3, 4):
            raise ValueError(f"scales: expected 2, 3 or 4 (deepest layers aligned), got {scales!r}")
        self.num_proxies, self.scales, self.strategy = num_proxies, scales, strategy
        self.reduction, self.detach_shallow, self.ignore_index = reduction, detach_shallow, ignore_index

    def sample(self, proj, label=None, first=None, generator=None) -> torch.Tensor:
        """Proxy indices (B, M) on the grid of ``proj``."""
        if label is not None:
            label = F.interpolate(label[:, None].float(), size=proj.shape[-2:], mode="nearest")[:, 0].long()
            label = label.masked_fill(label == self.ignore_index, 0)
        return busseg_ops.sample_proxies(
            proj.detach(), self.num_proxies, strategy=self.strategy, first=first, label=label, generator=generator
        )

    def forward(self, feats, proj, label=None, first=None, generator=None) -> torch.Tensor:
        if len(feats) < self.scales:
            raise ValueError(f"feats: expected at least scales={self.scales} maps, got {len(feats)}")
        feats = list(feats)[-self.scales :]
        idx = self.sample(proj, label, first, generator)
        src_hw, deep_hw = tuple(proj.shape[-2:]), tuple(feats[-1].shape[-2:])
        proxies, aligned = [], []
        for i, f in enumerate(feats):
            proxies.append(busseg_ops.gather_proxies(f, busseg_ops.map_proxy_indices(idx, src_hw, tuple(f.shape[-2:]))))
            if i < len(feats) - 1:
                f = upsample(f.detach() if self.detach_shallow else f, deep_hw)
            aligned.append(f)
        return busseg_ops.cross_layer_alignment_loss(aligned, proxies, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"num_proxies={self.num_proxies}, scales={self.scales}, strategy={self.strategy!r}"
