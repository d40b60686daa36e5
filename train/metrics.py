"""Evaluation metrics: per-image segmentation metrics (Dice, IoU, HD95 in pixels, precision,
recall, specificity, accuracy), classification metrics (accuracy, precision, recall, F1, AUC) and
the Wilcoxon signed-rank test (scipy is not a dependency).

Conventions for empty masks: both empty → Dice = IoU = 1 and HD95 = 0; exactly one empty →
Dice = IoU = 0 and HD95 = the image diagonal (the largest possible distance). Precision with no
predicted positives is 1 when there are no true positives to find, else 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SEG_KEYS = ("dice", "iou", "hd95", "precision", "recall", "specificity", "accuracy")


def _boundary(m: torch.Tensor) -> torch.Tensor:
    """Coordinates (N, 2) of the pixels of m on its 4-neighbour boundary (image border counts)."""
    x = m[None, None].float()
    eroded = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return torch.nonzero(m & (eroded[0, 0] < 0.5)).float()


def hd95(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """95th percentile of the symmetric boundary distances (medpy's hd95 convention)."""
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return math.hypot(*gt.shape)
    a, b = _boundary(pred), _boundary(gt)
    d = torch.cdist(a, b)
    dists = torch.cat([d.min(dim=1).values, d.min(dim=0).values])
    return float(torch.quantile(dists, 0.95))


def seg_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """Metrics of one binary prediction (H, W) against its ground truth (H, W); pixels of gt equal
    to 255 are ignored."""
    valid = gt != 255
    p, g = pred.bool() & valid, (gt == 1) & valid
    tp = float((p & g).sum())
    fp = float((p & ~g).sum())
    fn = float((~p & g).sum())
    tn = float((~p & ~g & valid).sum())
    empty = tp + fp + fn == 0
    return {
        "dice": 1.0 if empty else 2 * tp / (2 * tp + fp + fn),
        "iou": 1.0 if empty else tp / (tp + fp + fn),
        "hd95": hd95(p, g),
        "precision": tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0),
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "specificity": tn / (tn + fp) if tn + fp else 1.0,
        "accuracy": (tp + tn) / max(1.0, tp + tn + fp + fn),
    }


def summarize(rows: list[dict[str, float]], keys=SEG_KEYS) -> dict[str, tuple[float, float]]:
    """{key: (mean, std)} over images (population std)."""
    out = {}
    for k in keys:
        v = torch.tensor([r[k] for r in rows], dtype=torch.float64)
        out[k] = (float(v.mean()), float(v.std(unbiased=False))) if len(v) else (float("nan"), float("nan"))
    return out


# ----------------------------------------------------------------------------------------------
# Classification


def auc_binary(y: torch.Tensor, score: torch.Tensor) -> float:
    """Area under the ROC curve = Mann–Whitney U / (n⁺·n⁻), ties counted half."""
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _ranks(torch.cat([pos, neg]).double())
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def cls_metrics(y: torch.Tensor, prob: torch.Tensor) -> dict[str, float]:
    """y (N,) int, prob (N, K) class probabilities. Precision/recall/F1/AUC: the positive class
    for K = 2, macro averages (one-vs-rest) otherwise."""
    y = y.long()
    pred = prob.argmax(1)
    k = prob.shape[1]
    classes = [1] if k == 2 else list(range(k))
    prec, rec, f1, auc = [], [], [], []
    for c in classes:
        tp = float(((pred == c) & (y == c)).sum())
        fp = float(((pred == c) & (y != c)).sum())
        fn = float(((pred != c) & (y == c)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        prec.append(p)
        rec.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
        auc.append(auc_binary((y == c).long(), prob[:, c]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {
        "accuracy": float((pred == y).double().mean()),
        "precision": mean(prec),
        "recall": mean(rec),
        "f1": mean(f1),
        "auc": mean(auc),
    }


# ----------------------------------------------------------------------------------------------
# Wilcoxon signed-rank test


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    ranks = torch.empty_like(v, dtype=torch.float64)
    i, n = 0, len(v)
    while i < n:
        j = i
        while j + 1 < n and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon(x, y=None, alternative: str = "two-sided") -> tuple[float, float]:
    """Wilcoxon signed-rank test of x − y (or of x alone). Zero differences are dropped (Wilcoxon's
    method). Exact null distribution when n ≤ 50 and no ties, else the normal approximation with
    the tie correction (no continuity correction) — scipy.stats.wilcoxon's defaults.
    Returns (statistic, p). The statistic is min(W⁺, W⁻) for two-sided, W⁺ otherwise."""
    d = torch.as_tensor(x, dtype=torch.float64)
    if y is not None:
        d = d - torch.as_tensor(y, dtype=torch.float64)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    r = _ranks(d.abs())
    w_plus = float(r[d > 0].sum())
    w_minus = float(r[d < 0].sum())
    ties = len(torch.unique(d.abs())) < n
    if n <= 50 and not ties:
        # counts[s] = number of sign assignments with W⁺ = s.
        total = n * (n + 1) // 2
        counts = [1] + [0] * total
        for k in range(1, n + 1):
            for s in range(total, k - 1, -1):
                counts[s] += counts[s - k]
        denom = 2.0**n
        cdf = lambda s: sum(counts[: int(s) + 1]) / denom  # P(W⁺ ≤ s)  # noqa: E731
        if alternative == "two-sided":
            stat = min(w_plus, w_minus)
            return stat, min(1.0, 2 * cdf(stat))
        if alternative == "greater":
            return w_plus, 1 - cdf(w_plus - 1)
        return w_plus, cdf(w_plus)
    mean = n * (n + 1) / 4
    _, counts = torch.unique(d.abs(), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - float((counts.double() ** 3 - counts.double()).sum()) / 48
    z = (w_plus - mean) / math.sqrt(var) if var > 0 else 0.0
    sf = lambda t: 0.5 * math.erfc(t / math.sqrt(2))  # noqa: E731
    if alternative == "two-sided":
        return min(w_plus, w_minus), min(1.0, 2 * sf(abs(z)))
    return w_plus, sf(z) if alternative == "greater" else sf(-z)
