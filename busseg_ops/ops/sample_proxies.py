"""sample_proxies: the proxy sampling strategies of RA-BUSSeg's cross-layer relation alignment
compared in its supplementary Table 4, one contract for all."""

from __future__ import annotations

import torch

from .. import _validate
from ..reference import sample_proxies as _strategies
from .greedy_proxy_sampling import check_features_and_count, greedy_proxy_sampling

STRATEGIES = ("greedy", "random", "kmeans", "patch")


def sample_proxies(
    feat: torch.Tensor,
    num_proxies: int = 64,
    strategy: str = "greedy",
    first=None,
    label=None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    kmeans_iterations: int = 10,
):
    """Proxy pixels of ``feat`` (B, C, H, W) by ``strategy``, all (B, M) int64 distinct, whatever
    the feature values: ``greedy`` (ours, :func:`greedy_proxy_sampling`), ``random`` (uniform
    without replacement), ``kmeans`` (pixels nearest to k-means centres, k-means++ seeding) or
    ``patch`` (one per cell of a rows x cols grid with rows*cols = M: the pixel nearest to the
    cell's mean feature). ``first``/``label``/``scale`` apply to greedy only. Plain PyTorch on any
    device for the strategies other than greedy, float16 / bfloat16 features in float32."""
    _validate.choice("strategy", strategy, STRATEGIES)
    if strategy == "greedy":
        return greedy_proxy_sampling(feat, num_proxies, first, label, scale, generator)
    check_features_and_count(feat, num_proxies)
    B, _, H, W = feat.shape
    feat = feat.detach().to(torch.promote_types(feat.dtype, torch.float32))
    with torch.no_grad():
        if strategy == "random":
            return _strategies.random_proxies(B, H * W, num_proxies, generator, feat.device)
        if strategy == "kmeans":
            _validate.integer("kmeans_iterations", kmeans_iterations, minimum=0)
            return _strategies.kmeans_proxies(feat, num_proxies, kmeans_iterations, generator)
        return _strategies.patch_proxies(feat, num_proxies)
