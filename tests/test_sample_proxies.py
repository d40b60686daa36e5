"""sample_proxies (RA-BUSSeg supplementary Table 4): every strategy's contract (distinct int64
indices, reproducible with a generator, whatever the feature values), and the patch and k-means
strategies against their definitions."""

import pytest
import torch

from busseg_ops import sample_proxies
from busseg_ops.ops.sample_proxies import MAX_KMEANS_ITERATIONS


@pytest.mark.parametrize("strategy", ["random", "kmeans", "patch", "greedy"])
def test_sampling_strategies_share_the_contract(strategy):
    feat = torch.randn(3, 4, 8, 10)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    idx = sample_proxies(feat, 16, strategy, generator=gen())
    assert idx.dtype == torch.int64 and idx.shape == (3, 16)
    assert all(len(set(row.tolist())) == 16 for row in idx) and 0 <= idx.min() and idx.max() < 80
    assert torch.equal(idx, sample_proxies(feat, 16, strategy, generator=gen()))


def test_patch_strategy_takes_the_pixel_nearest_each_patch_mean():
    feat = torch.randn(2, 3, 8, 12)
    idx = sample_proxies(feat, 6, "patch")  # 2 x 3 grid of 4 x 4 patches
    for b in range(2):
        for m, j in enumerate(idx[b].tolist()):
            y0, x0 = 4 * (m // 3), 4 * (m % 3)
            patch = feat[b, :, y0 : y0 + 4, x0 : x0 + 4].reshape(3, 16)
            k = (patch - patch.mean(1, keepdim=True)).norm(dim=0).argmin().item()
            assert j == (y0 + k // 4) * 12 + x0 + k % 4


def test_kmeans_strategy_finds_one_proxy_per_cluster():
    centres = torch.randn(4, 6) * 10
    assign = torch.randperm(40) % 4
    feat = (centres[assign] + 0.01 * torch.randn(40, 6)).T.reshape(1, 6, 5, 8)
    idx = sample_proxies(feat, 4, "kmeans", generator=torch.Generator().manual_seed(1), kmeans_iterations=20)
    assert sorted(assign[idx[0]].tolist()) == [0, 1, 2, 3]  # k-means++ seeds separate them


def test_kmeans_stops_once_the_assignments_no_longer_change(monkeypatch):
    feat = torch.randn(2, 5, 9, 11)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    converged = sample_proxies(feat, 6, "kmeans", generator=gen(), kmeans_iterations=200)
    calls = []
    cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda *a, **k: calls.append(1) or cdist(*a, **k))
    capped = sample_proxies(feat, 6, "kmeans", generator=gen(), kmeans_iterations=MAX_KMEANS_ITERATIONS)
    steps = len(calls) - 1  # one cdist per Lloyd step, one for the final nearest pixels
    assert torch.equal(capped, converged) and 1 < steps < 200  # stopped at its fixed point
    calls.clear()
    again = sample_proxies(feat, 6, "kmeans", generator=gen(), kmeans_iterations=steps - 1)
    assert len(calls) == steps  # one step short of convergence: every step ran
    calls.clear()
    assert torch.equal(sample_proxies(feat, 6, "kmeans", generator=gen(), kmeans_iterations=steps), converged)
    assert len(calls) == steps + 1 and again.shape == (2, 6)


@pytest.mark.parametrize("strategy", ["random", "kmeans", "patch", "greedy"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_features_still_give_distinct_proxies(strategy, value):
    feat = torch.randn(2, 3, 4, 6)
    feat[0] = value  # every distance of image 0 non-finite (or overflowing)
    feat[1, :, 1:3] = value
    idx = sample_proxies(feat, 12, strategy, generator=torch.Generator().manual_seed(3))
    assert idx.shape == (2, 12) and all(len(set(row.tolist())) == 12 for row in idx)
    assert 0 <= idx.min() and idx.max() < 24


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda f: sample_proxies(f, 3, "grid"), ValueError, "strategy must be one of"),
        (lambda f: sample_proxies(f, 36, "random"), ValueError, r"num_proxies must be <= H\*W"),
        (lambda f: sample_proxies(f, 11, "patch"), ValueError, "num_proxies=11 cannot be laid out"),
        (lambda f: sample_proxies(f, 3, "kmeans", kmeans_iterations=-1), ValueError, "kmeans_iterations must be >= 0"),
        (
            lambda f: sample_proxies(f, 3, "kmeans", kmeans_iterations=2**62),
            ValueError,
            "kmeans_iterations must be <= 1000",
        ),
        (
            lambda f: sample_proxies(f, 3, "kmeans", kmeans_iterations=1001),
            ValueError,
            "kmeans_iterations must be <= 1000",
        ),
        (
            lambda f: sample_proxies(f, 3, "kmeans", kmeans_iterations=True),
            TypeError,
            "kmeans_iterations must be an int",
        ),
        (
            lambda f: sample_proxies(f, 3, "kmeans", kmeans_iterations=5.0),
            TypeError,
            "kmeans_iterations must be an int",
        ),
        (lambda f: sample_proxies(f, True, "random"), TypeError, "num_proxies must be an int"),
        (lambda f: sample_proxies(f, 3, "random", generator=7), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_sampling_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 4, 5, 7))


@pytest.mark.parametrize("strategy", ["random", "kmeans", "patch", "greedy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampling_half_features_as_float32(strategy, dtype):
    feat = torch.randn(2, 4, 8, 10).to(dtype)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    idx = sample_proxies(feat, 12, strategy, generator=gen())
    assert torch.equal(idx, sample_proxies(feat.float(), 12, strategy, generator=gen()))
