"""Metrics against brute-force references of the field's conventions: HD95 as medpy's hd95
(cross-shaped surface, all-pairs Euclidean distances, numpy's linear percentile), the Wilcoxon test
as scipy.stats.wilcoxon, AUC as the share of correctly ordered pairs (sklearn's roc_auc_score)."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from busseg_ops.train import metrics


def test_segmentation_metrics_known_values():
    gt = torch.zeros(20, 20, dtype=torch.long)
    gt[5:10, 5:10] = 1
    r = metrics.seg_metrics(gt.clone(), gt)
    assert r["dice"] == 1 and r["iou"] == 1 and r["hd95"] == 0 and r["accuracy"] == 1
    pred = torch.zeros(20, 20, dtype=torch.long)
    pred[5:10, 8:13] = 1  # shifted 3 px right: overlap 5×2
    r = metrics.seg_metrics(pred, gt)
    assert math.isclose(r["dice"], 2 * 10 / 50) and math.isclose(r["iou"], 10 / 40)
    assert math.isclose(r["precision"], 10 / 25) and math.isclose(r["recall"], 10 / 25)
    assert math.isclose(r["specificity"], (400 - 40) / (400 - 25))
    assert math.isclose(r["hd95"], 3.0)
    empty = torch.zeros(20, 20, dtype=torch.long)
    assert metrics.seg_metrics(empty, empty)["dice"] == 1 and metrics.seg_metrics(empty, empty)["hd95"] == 0
    assert metrics.seg_metrics(empty, gt)["dice"] == 0
    assert math.isclose(metrics.seg_metrics(empty, gt)["hd95"], math.hypot(20, 20))
    assert math.isclose(metrics.seg_metrics(gt, empty)["hd95"], math.hypot(20, 20))
    ign = gt.clone()
    ign[:, 12:] = 255  # ignored pixels count nowhere
    pred2 = gt.clone()
    pred2[:, 12:] = 1
    assert metrics.seg_metrics(pred2, ign)["dice"] == 1 and metrics.seg_metrics(pred2, ign)["hd95"] == 0


# ---------------------------------------------------------------------------------------------- HD95


def _surface_brute(m: np.ndarray) -> np.ndarray:
    """Pixels of m with a 4-neighbour outside m (outside the image counts as outside m)."""
    h, w = m.shape
    out = np.zeros_like(m)
    for y, x in zip(*np.nonzero(m)):
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w) or not m[yy, xx]:
                out[y, x] = True
    return out


def _percentile95(v: np.ndarray) -> float:
    """numpy's default ("linear") percentile written out: rank 0.95·(n − 1), interpolated."""
    v = np.sort(v)
    r = 0.95 * (len(v) - 1)
    lo = int(math.floor(r))
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (r - lo) * (v[hi] - v[lo]))


def _hd95_brute(a: np.ndarray, b: np.ndarray) -> float:
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.hypot(*a.shape)
    pa = np.argwhere(_surface_brute(a)).astype(float)
    pb = np.argwhere(_surface_brute(b)).astype(float)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairs
    return _percentile95(np.concatenate([d.min(1), d.min(0)]))


def _random_mask(rng: np.random.RandomState, h: int, w: int, kind: str) -> np.ndarray:
    m = np.zeros((h, w), bool)
    if kind == "empty":
        return m
    if kind == "pixel":
        m[rng.randint(h), rng.randint(w)] = True
    elif kind == "hline":  # one pixel thick
        y, x0 = rng.randint(h), rng.randint(w // 2)
        m[y, x0 : x0 + rng.randint(2, w - x0 + 1)] = True
    elif kind == "diagonal":  # 8-connected only: every pixel is surface
        for i in range(min(h, w) - rng.randint(min(h, w) // 2 + 1)):
            m[i, i] = True
    elif kind == "border":  # touches the image border
        m[: rng.randint(1, h + 1), : rng.randint(1, w + 1)] = True
    elif kind == "full":
        m[:] = True
    elif kind == "blob":  # ellipse with a hole and a second component
        yy, xx = np.mgrid[:h, :w]
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        m &= ((yy - cy) / (ry / 3)) ** 2 + ((xx - cx) / (rx / 3)) ** 2 > 1
        m[rng.randint(h), rng.randint(w)] = True
    elif kind == "noise":
        m = rng.rand(h, w) < 0.3
    return m


KINDS = ["empty", "pixel", "hline", "diagonal", "border", "full", "blob", "noise"]


def test_hd95_equals_brute_force_medpy_convention():
    rng = np.random.RandomState(0)
    shapes = [(17, 23), (9, 31), (24, 24), (1, 12), (30, 7)]
    cases = list(itertools.product(KINDS, KINDS))  # 64 kind pairs, each on a random shape
    for i, (ka, kb) in enumerate(cases):
        h, w = shapes[i % len(shapes)]
        a, b = _random_mask(rng, h, w, ka), _random_mask(rng, h, w, kb)
        got = metrics.hd95(torch.from_numpy(a), torch.from_numpy(b))
        assert math.isclose(got, _hd95_brute(a, b), rel_tol=1e-9, abs_tol=1e-9), (ka, kb, h, w)
        assert math.isclose(got, metrics.hd95(b, a), rel_tol=1e-9, abs_tol=1e-9)  # symmetric


def test_hd95_uses_the_cross_not_the_square_boundary():
    # The centre of a plus sign has its four neighbours inside: not on the surface with medpy's
    # cross-shaped erosion, though on the 8-neighbour boundary a 3×3 erosion gives.
    plus = np.zeros((7, 7), bool)
    plus[3, 1:6] = plus[1:6, 3] = True
    assert np.array_equal(metrics.surface(plus), _surface_brute(plus))
    assert not metrics.surface(plus)[3, 3] and metrics.surface(plus).sum() == 8
    centre = np.zeros((7, 7), bool)
    centre[3, 3] = True
    assert metrics.hd95(plus, centre) == pytest.approx(_percentile95(np.array([1, 1, 1, 1, 2, 2, 2, 2, 1.0])))


# ---------------------------------------------------------------------------------------------- Wilcoxon


@pytest.mark.parametrize(
    "d",
    [
        [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75],  # scipy's documentation example
        [0, 0, 1, -2, 3, 3, -3, 4, 0.5, 5],  # zeros and ties, n ≤ 13
        [0, 1, 1, 1, -1, 2, -2, 3, 0],  # many ties, n = 9
        [0.1, -0.2, 0.3, 0, 0.4, 0.5, -0.6, 0.7],  # one zero, no ties
        list(np.round(np.random.RandomState(3).randn(60), 1) + 0.3),  # n > 50 with ties
        [0.5] * 5 + [-0.5] * 2,
    ],
)
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_wilcoxon_equals_scipy(d, alternative):
    ref = scipy.stats.wilcoxon(d, alternative=alternative)
    stat, p = metrics.wilcoxon(d, alternative=alternative)
    assert stat == ref.statistic and p == ref.pvalue


def test_wilcoxon_paired_form_equals_scipy():
    x = np.linspace(0, 1, 8)  # float rounding of x − y may break ties: against scipy's own paired form
    y = x + np.array([0, 0.1, -0.1, 0.2, 0.2, -0.3, 0.4, 0])
    ref = scipy.stats.wilcoxon(x, y)
    assert metrics.wilcoxon(x, y) == (ref.statistic, ref.pvalue)


def test_wilcoxon_all_zero_differences():
    assert metrics.wilcoxon([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0)


# ---------------------------------------------------------------------------------------------- AUC


def _auc_pairs(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auc_is_the_share_of_correctly_ordered_pairs():
    rng = np.random.RandomState(1)
    for n in (5, 12, 40):
        y = rng.randint(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.rand(n), 1)  # many ties
        assert math.isclose(metrics.auc_binary(torch.from_numpy(y), torch.from_numpy(s)), _auc_pairs(y, s))
    assert math.isnan(metrics.auc_binary(torch.ones(3), torch.rand(3)))


def test_classification_metrics():
    y = torch.tensor([0, 0, 1, 1, 1])
    prob = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.7, 0.3]])
    r = metrics.cls_metrics(y, prob)
    assert math.isclose(r["accuracy"], 4 / 5) and math.isclose(r["precision"], 1.0)
    assert math.isclose(r["recall"], 2 / 3) and math.isclose(r["f1"], 0.8)
    assert math.isclose(r["auc"], 5 / 6)  # pairs ordered correctly: 5 of 6
