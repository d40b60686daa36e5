"""Figures: overlays as in the papers (red ground truth, green prediction, yellow overlap) and the
training-curve plot from the CSV log."""

from __future__ import annotations

import csv
import os

import numpy as np


def overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB (H, W, 3): grayscale image (H, W) in [0, 1] or uint8, blended with red where only
    the ground truth is, green where only the prediction is, yellow where both are."""
    img = image.astype(np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    rgb = np.repeat(img[..., None], 3, axis=2)
    p = pred.astype(bool)
    g = (gt == 1) if gt is not None else np.zeros_like(p)
    colours = {(True, False): (1.0, 0.0, 0.0), (False, True): (0.0, 1.0, 0.0), (True, True): (1.0, 1.0, 0.0)}
    for (in_gt, in_pred), c in colours.items():
        sel = (g == in_gt) & (p == in_pred)
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.array(c)
    return (rgb * 255).round().astype(np.uint8)


def enlarge(array: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Nearest-neighbour integer upscaling so small training crops stay readable as pictures."""
    factor = max(1, -(-min_side // min(array.shape[:2])))
    return array.repeat(factor, axis=0).repeat(factor, axis=1)


def save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)


def _series(ax, points, label: str, marker: str | None = None) -> None:
    """Plot (epoch, text value) points, blanks and NaN left out; a series of one point gets a
    marker (a line through one point is invisible); an empty one is not drawn (nor in the legend)."""
    pts = [(e, float(v)) for e, v in points if v not in ("", None) and float(v) == float(v)]
    if pts:
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker=marker or ("o" if len(pts) == 1 else None), label=label
        )


def plot_curves(csv_path: str, out_path: str) -> str:
    """Loss and validation Dice against epoch, from the engine's metrics.csv; a third panel with
    the pseudo-label check (pl_* columns) when the run logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    checked = bool(rows) and "pl_dice" in rows[0]
    fig, axes = plt.subplots(1, 3 if checked else 2, figsize=(15 if checked else 10, 4))
    ax1, ax2 = axes[:2]
    for key in rows[0] if rows else []:
        if key.startswith("loss"):  # a term may start late (loss_u after warm-up): skip blanks
            _series(ax1, [(e, r.get(key, "")) for e, r in zip(epochs, rows)], key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (epoch mean)")
    if rows and "val_dice" in rows[0]:
        _series(ax2, [(e, r["val_dice"]) for e, r in zip(epochs, rows)], "val Dice (teacher)", marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    if checked:
        labels = {"pl_dice": "Dice", "pl_acc": "accuracy", "pl_kept": "kept share", "pl_kept_acc": "accuracy, kept"}
        for key, label in labels.items():
            _series(axes[2], [(e, r.get(key, "")) for e, r in zip(epochs, rows)], label, marker=".")
        axes[2].set_xlabel("epoch")
        axes[2].set_title("teacher pseudo-labels on the check set", fontsize=9)
        axes[2].set_ylim(0, 1)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
