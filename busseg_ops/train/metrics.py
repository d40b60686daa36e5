"""Evaluation metrics, as the papers report them (HD95 as medpy computes it), their conventions for
empty masks and ignored pixels (docs/methods.md), and the Wilcoxon signed-rank test."""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi
import scipy.stats
import torch

SEG_KEYS = ("dice", "iou", "hd95", "precision", "recall", "specificity", "accuracy")
CROSS = ndi.generate_binary_structure(2, 1)  # medpy's default connectivity=1


def _numpy_bool(m) -> np.ndarray:
    return (m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)).astype(bool)


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's surface: mask XOR its erosion by the cross (outside the image is background)."""
    return mask ^ ndi.binary_erosion(mask, structure=CROSS, iterations=1, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each surface pixel of `a` to the nearest surface pixel of `b` (both non-empty)."""
    return ndi.distance_transform_edt(~surface(b))[surface(a)]


def hd95(pred, gt) -> float:
    """95th percentile of the pooled directed surface distances (medpy's hd95; module docstring)."""
    p, g = _numpy_bool(pred), _numpy_bool(gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return math.hypot(*g.shape)
    return float(np.percentile(np.hstack((surface_distances(p, g), surface_distances(g, p))), 95))


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
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))
    return out


# ----------------------------------------------------------------------------------------------
# Classification


def auc_binary(y: torch.Tensor, score: torch.Tensor) -> float:
    """Area under the ROC curve = Mann–Whitney U / (n⁺·n⁻): the share of (positive, negative) pairs
    ordered correctly, ties counted half — the value of sklearn's roc_auc_score."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(scipy.stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


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


def wilcoxon(x, y=None, alternative: str = "two-sided") -> tuple[float, float]:
    """scipy.stats.wilcoxon of x − y (or of x alone) with its defaults: zero differences dropped
    (Wilcoxon's method), the exact distribution for small samples without ties or zeros, else the
    normal approximation with the tie correction. Returns (statistic, p); all differences zero
    gives (0, 1), as scipy does, without its division warning."""
    d = np.asarray(x, dtype=np.float64)
    if y is not None:
        d = d - np.asarray(y, dtype=np.float64)
    if not np.any(d != 0):
        return 0.0, 1.0
    res = scipy.stats.wilcoxon(d, alternative=alternative)
    return float(res.statistic), float(res.pvalue)
