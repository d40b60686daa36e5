"""Drop-in for RA-BUSSeg's public code (dodooo1/RA-BUSSeg): ``Corr`` (rabusseg/models/decoder.py)
and the losses of rabusseg/utils/loss_helper.py with their signatures, return structures and
global-RNG draws, on busseg_ops' ops. ``Corr``'s ``'corr_map'`` is a :class:`CorrelationMap`, which
never forms the (B, HW, HW) map (545 MiB in float32 at 65×65 for B = 8). Porting: docs/porting.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import busseg_ops

#: Landmarks per image (upstream hard-codes 64 in compute_rank_loss_landmark).
NUM_LANDMARKS = 64

__all__ = [
    "NUM_LANDMARKS",
    "upstream_scale",
    "CorrelationMap",
    "Corr",
    "compute_rank_loss_landmark",
    "orthogonal_landmarks_refine",
    "compute_unsupervised_loss",
    "compute_corr_loss",
]


def upstream_scale(channels: int) -> float:
    """1 / sqrt(C) as upstream takes it: ``torch.sqrt(torch.tensor(C).float())`` rounds the root
    to float32 (16 exactly for C = 256; for other C it differs from the double root in the 8th
    digit, which float64 tests see)."""
    return 1.0 / float(torch.tensor(float(channels), dtype=torch.float32).sqrt())


class CorrelationMap:
    """Stands for the global correlation map ``scale * F^T F`` (B, HW, HW) of features F
    (B, C, H, W) without forming it. It carries what :func:`compute_rank_loss_landmark` needs
    (the features and the scale) and answers ``shape``, ``size()``, ``dim()``, ``len()``,
    ``dtype``, ``device``, ``detach()`` and batch slicing (``corr_map[:n]``, ``corr_map[idx]``
    with an index tensor). ``rows(index)`` forms selected rows; ``materialize()`` the whole map,
    for code that needs a tensor. The features keep their autograd graph, as upstream's map does.
    """

    def __init__(self, feature: torch.Tensor, scale: float):
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
            raise ValueError(
                f"CorrelationMap needs features (B, C, H, W), got {getattr(feature, 'shape', type(feature).__name__)}"
            )
        self.feature = feature
        self.scale = float(scale)

    @property
    def shape(self) -> torch.Size:
        B, _, H, W = self.feature.shape
        return torch.Size((B, H * W, H * W))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.feature.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.feature.dtype

    @property
    def device(self) -> torch.device:
        return self.feature.device

    def detach(self) -> CorrelationMap:
        return CorrelationMap(self.feature.detach(), self.scale)

    def __getitem__(self, index) -> CorrelationMap:
        """Images of the batch: a slice or a 1-D index tensor / list (the batch dim is kept)."""
        if isinstance(index, slice) or (isinstance(index, (torch.Tensor, list)) and torch.as_tensor(index).dim() == 1):
            return CorrelationMap(self.feature[index], self.scale)
        # upstream's loss_helper indexes rows (corr_map[b, landmark, :]): the likely cause is a
        # swapped Corr beside upstream's loss, so the message names the import that fixes it
        parts = index if isinstance(index, tuple) else (index,)
        shown = ", ".join(f"tensor{tuple(p.shape)}" if isinstance(p, torch.Tensor) else repr(p) for p in parts)
        raise TypeError(
            f"a CorrelationMap indexes only its batch (a slice or a 1-D index), got [{shown}]: with "
            "busseg_ops' Corr, import compute_rank_loss_landmark (and orthogonal_landmarks_refine) from "
            "busseg_ops.compat.rabusseg instead of rabusseg.utils.loss_helper; elsewhere call .rows(index) "
            "for rows of the map or .materialize() for the (B, HW, HW) tensor"
        )

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (pixel indices) of every image's map: (B, len(index), HW)."""
        flat = self.feature.flatten(2)
        index = torch.as_tensor(index, device=flat.device).long()
        return torch.matmul(flat[:, :, index].transpose(1, 2), flat) * self.scale

    def materialize(self) -> torch.Tensor:
        """The (B, HW, HW) map itself (B·HW² elements)."""
        flat = self.feature.flatten(2)
        return torch.matmul(flat.transpose(1, 2), flat) * self.scale

    def __repr__(self) -> str:
        shape = tuple(self.shape)
        return f"CorrelationMap(shape={shape}, scale={self.scale:.6g}, dtype={self.dtype}, device={self.device})"


class Corr(nn.Module):
    """RA-BUSSeg's ``Corr`` (same constructor, attributes and ``forward(feature_in, out)``).

    ``forward`` returns ``{'corr_map': CorrelationMap, 'out': ...}``: ``out`` (B, K, H, W) is the
    detached ``out`` resized bilinearly (align_corners=True) to the feature grid and propagated
    over each 3×3 neighbourhood (zero padding) by busseg_ops' ARP with upstream's scale; the
    unfolded features and the correlation map are never formed. ``out`` is cast to the features'
    dtype (upstream lets type promotion decide). ``sample`` and ``normalize_corr_map`` (unused by
    upstream's decoder) behave as upstream's, ``sample`` also on a :class:`CorrelationMap`.
    """

    def __init__(self, nclass=21):
        super().__init__()
        self.nclass = nclass
        self.kernel_size = 3

    def forward(self, feature_in, out):
        if not isinstance(feature_in, torch.Tensor) or feature_in.dim() != 4:
            raise ValueError(f"feature_in must be (B, C, H, W), got {getattr(feature_in, 'shape', feature_in)!r}")
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(f"out must be decoder logits (B, K, h, w), got {getattr(out, 'shape', out)!r}")
        scale = upstream_scale(feature_in.shape[1])
        value = F.interpolate(out.detach(), feature_in.shape[2:], mode="bilinear", align_corners=True)
        propagated = busseg_ops.adjacent_relation_propagation(
            feature_in, value.to(feature_in.dtype), kernel_size=self.kernel_size, scale=scale
        )
        return {"corr_map": CorrelationMap(feature_in, scale), "out": propagated}

    def sample(self, corr_map, h_in, w_in):
        """128 rows of the map at pixels drawn with the global torch RNG from [0, h_in*w_in - 1),
        one draw as upstream: (B, 128, HW)."""
        index = torch.randint(0, h_in * w_in - 1, [128])
        if isinstance(corr_map, CorrelationMap):
            return corr_map.rows(index)
        return corr_map[:, index.long(), :]

    def normalize_corr_map(self, corr_map, h_in, w_in, h_out, w_out):
        """Each row of (n, m, h_in*w_in) resized bilinearly (align_corners=True) to h_out×w_out and
        min-max scaled to [0, 1]: (n, m, h_out*w_out)."""
        n, m, _ = corr_map.shape
        maps = F.interpolate(
            corr_map.reshape(n * m, 1, h_in, w_in), (h_out, w_out), mode="bilinear", align_corners=True
        ).reshape(n * m, h_out * w_out)
        low = maps.amin(1, keepdim=True)
        return ((maps - low) / (maps.amax(1, keepdim=True) - low)).view(n, m, h_out * w_out)


# ---- landmarks ---------------------------------------------------------------------------------


def _check_layers(q1, q2, q3, qh):
    for name, q in (("feat_x1", q1), ("feat_x2", q2), ("feat_x3", q3), ("high_feat", qh)):
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"{name} must be (B, C, H, W), got {getattr(q, 'shape', type(q).__name__)}")
        if q.shape[0] != qh.shape[0]:
            raise ValueError(f"{name} has batch {q.shape[0]}, high_feat has {qh.shape[0]}")
    for name, q in (("feat_x2", q2), ("feat_x3", q3)):
        if q.shape[2:] != qh.shape[2:]:
            raise ValueError(
                f"{name} must be on high_feat's grid {tuple(qh.shape[2:])} (its landmarks are taken at the "
                f"same pixels), got {tuple(q.shape[2:])}"
            )


def _first_landmarks(label: torch.Tensor, grid) -> torch.Tensor:
    """Upstream's first landmark per image, with its global-RNG calls in its order: the label
    resized (nearest) to the deep grid; a uniform nonzero pixel (255 counts) by
    ``torch.randint(0, count, (1,))``, else a uniform pixel by ``torch.randint(HW, (1, 1))``."""
    if not isinstance(label, torch.Tensor) or label.dim() != 3:
        raise ValueError(f"label must be (B, H, W), got {getattr(label, 'shape', type(label).__name__)}")
    B = label.shape[0]
    small = F.interpolate(label.unsqueeze(1).float(), grid, mode="nearest").squeeze(1).to(torch.int)
    nonzero = small.reshape(B, -1) != 0
    counts = nonzero.sum(1).tolist()
    hw = nonzero.shape[1]
    draws = []
    for count in counts:
        if count > 0:
            draws.append(int(torch.randint(0, count, (1,))))
        else:
            draws.append(int(torch.randint(hw, (1, 1))))
    k = torch.tensor(draws, device=label.device)
    kth_nonzero = (nonzero.cumsum(1) > k[:, None]).int().argmax(1)  # first pixel with k+1 nonzero up to it
    has = torch.tensor(counts, device=label.device) > 0
    return torch.where(has, kth_nonzero, k)


def _greedy_on_map(corr_map: torch.Tensor, first: torch.Tensor, num_landmarks: int) -> torch.Tensor:
    """Upstream's greedy rule on a formed (B, HW, HW) map, all images at once: the next landmark
    minimises the running max of the cumulative similarity rows (ties to the smallest index)."""
    B, hw = corr_map.shape[:2]
    batch = torch.arange(B, device=corr_map.device)
    last = first.to(corr_map.device)
    chosen = torch.zeros(B, hw, dtype=torch.bool, device=corr_map.device)
    chosen[batch, last] = True
    cumulative = torch.zeros(B, hw, dtype=corr_map.dtype, device=corr_map.device)
    score = torch.full_like(cumulative, -math.inf)
    picks = [last]
    with torch.no_grad():
        for _ in range(1, num_landmarks):
            cumulative = cumulative + corr_map[batch, last]
            score = torch.maximum(score, cumulative)
            last = score.masked_fill(chosen, math.inf).argmin(1)
            chosen[batch, last] = True
            picks.append(last)
    return torch.stack(picks, 1)


def _landmarks(q1, q2, q3, qh, corr_map, label, num_landmarks):
    """Greedy landmark pixels on the deep grid (B, M) in selection order, and their pixels on
    layer 1's grid (the top-left pixel of each block, upstream's mapping)."""
    _check_layers(q1, q2, q3, qh)
    B, _, Hh, Wh = qh.shape
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or not 1 <= num_landmarks <= Hh * Wh:
        raise ValueError(f"num_landmarks must be an int in [1, H*W = {Hh * Wh}], got {num_landmarks!r}")
    if tuple(corr_map.shape) != (B, Hh * Wh, Hh * Wh):
        raise ValueError(
            f"corr_map must be (B, HW, HW) = {(B, Hh * Wh, Hh * Wh)} on high_feat's grid, got {tuple(corr_map.shape)}"
        )
    first = _first_landmarks(label, (Hh, Wh))
    if isinstance(corr_map, CorrelationMap):
        idx = busseg_ops.greedy_proxy_sampling(
            corr_map.feature, num_landmarks, first=first.to(corr_map.device), scale=corr_map.scale
        )
    elif isinstance(corr_map, torch.Tensor):
        idx = _greedy_on_map(corr_map.detach(), first, num_landmarks)
    else:
        raise TypeError(f"corr_map must be a CorrelationMap or a (B, HW, HW) tensor, got {type(corr_map).__name__}")
    idx = idx.to(qh.device)
    return idx, busseg_ops.map_proxy_indices(idx, (Hh, Wh), tuple(q1.shape[2:]))


def orthogonal_landmarks_refine(q1, q2, q3, qh, corr_map, label, num_landmarks=64):
    """Upstream's landmark features ``(landmarks_h, landmarks_1, landmarks_2, landmarks_3)``,
    each (B, M, C_l), in ascending pixel order (as upstream's masked_select gives them), layer 1
    at the mapped pixels of its finer grid. Gradients flow to the four maps as upstream's.
    ``corr_map``: a :class:`CorrelationMap` (greedy sampling without the map) or a (B, HW, HW)
    tensor. Upstream marks chosen pixels with 100000 instead of +inf, so a map whose cumulative
    similarities exceed 1e5 could make it pick a pixel twice; here picks are always distinct."""
    idx, idx_l = _landmarks(q1, q2, q3, qh, corr_map, label, num_landmarks)
    idx, idx_l = idx.sort(1).values, idx_l.sort(1).values
    gather = busseg_ops.gather_proxies
    return gather(qh, idx), gather(q1, idx_l), gather(q2, idx), gather(q3, idx)


def _to_grid(feat: torch.Tensor, grid) -> torch.Tensor:
    """Detached, bilinear (align_corners=True) to ``grid``; a map already there is used as is
    (the resize would be an exact copy)."""
    feat = feat.detach()
    if tuple(feat.shape[2:]) == tuple(grid):
        return feat
    return F.interpolate(feat, grid, mode="bilinear", align_corners=True)


def compute_rank_loss_landmark(feat_x1, feat_x2, feat_x3, high_feat, corr_map, label):
    """RA-BUSSeg's cross-layer alignment loss, same value and gradients: 64 greedy landmarks
    (first one per image from the global torch RNG, as upstream), then the mean over the three
    adjacent layer pairs of KLDivLoss(reduction='mean')(log(P_l + 1e-10), P_{l+1}) with
    P = softmax over landmarks of <pixel, landmark>, shallow maps resized (detached) to the deep
    grid. busseg_ops' fused loss never forms the (B, HW, M) distributions.

    ``corr_map``: the :class:`CorrelationMap` of :class:`Corr` (the map is never formed) or a real
    (B, HW, HW) tensor. Landmark choices agree with upstream's wherever two candidates' scores are
    not within float rounding of each other (the op computes the scores from the features).
    Where a target softmax underflows to 0 (wide unnormalised features in float32), upstream's
    gradients are NaN (torch 2.x kl_div differentiates the target: log 0); ours are finite."""
    idx, idx_l = _landmarks(feat_x1, feat_x2, feat_x3, high_feat, corr_map, label, NUM_LANDMARKS)
    grid = tuple(high_feat.shape[2:])
    feats = [_to_grid(f, grid) for f in (feat_x1, feat_x2, feat_x3)] + [high_feat]
    gather = busseg_ops.gather_proxies
    proxies = [gather(feat_x1, idx_l), gather(feat_x2, idx), gather(feat_x3, idx), gather(high_feat, idx)]
    return busseg_ops.cross_layer_alignment_loss(feats, proxies, reduction="mean", eps=1e-10)


# ---- plain cross-entropy terms (no op of ours applies; here so the whole import can move) ------


def compute_unsupervised_loss(predict, target):
    """Cross-entropy over the non-ignored (255) pixels, scaled by B*h*w / (their number)."""
    B, _, h, w = predict.shape
    return B * h * w / (target != 255).sum() * F.cross_entropy(predict, target, ignore_index=255)


def compute_corr_loss(pred_corr, target):
    """Cross-entropy of the propagated logits (ARP's ``out``, resized) against ``target``."""
    return F.cross_entropy(pred_corr, target.long(), ignore_index=255)
