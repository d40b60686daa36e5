"""sample_proxies: the proxy sampling strategies of RA-BUSSeg's cross-layer relation alignment
compared in its supplementary Table 4, one contract for all."""

from __future__ import annotations

import torch

from .. import _validate
from ..reference import sample_proxies as _strategies
from .greedy_proxy_sampling import check_features_and_count, greedy_proxy_sampling

STRATEGIES = ("greedy", "random", "kmeans", "patch")

#: Lloyd's iterations stop early once no assignment changes; this caps a request that never would.
MAX_KMEANS_ITERATIONS = 1000


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
    cell's mean feature). ``first``/``label``/``scale`` apply to greedy only. k-means runs at most
    ``kmeans_iterations`` Lloyd steps (an int in [0, MAX_KMEANS_ITERATIONS]) and stops as soon as
    no assignment changes (the centres are then fixed). Plain PyTorch on any device for the
    strategies other than greedy, float16 / bfloat16 features in float32."""
    _validate.choice("strategy", strategy, STRATEGIES)
    _validate.integer("kmeans_iterations", kmeans_iterations, minimum=0, maximum=MAX_KMEANS_ITERATIONS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if strategy == "greedy":
        return greedy_proxy_sampling(feat, num_proxies, first, label, scale, generator)
    check_features_and_count(feat, num_proxies)
    B, _, H, W = feat.shape
    feat = feat.detach().to(torch.promote_types(feat.dtype, torch.float32))
    with torch.no_grad():
        if strategy == "random":
            return _strategies.random_proxies(B, H * W, num_proxies, generator, feat.device)
        if strategy == "kmeans":
            return _strategies.kmeans_proxies(feat, num_proxies, kmeans_iterations, generator)
        return _strategies.patch_proxies(feat, num_proxies)
