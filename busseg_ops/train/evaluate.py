"""Whole-image evaluation, as upstream validates: each image at its own size, so that the metrics
do not depend on the training crop (details: docs/methods.md); also the pseudo-label diagnosis,
the result files and the comparison of runs."""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from . import augment, data, metrics, visualize
from .errors import UserError

CONVENTIONS = {
    "resolution": "each image at its original size (padded to the network stride, cropped back)",
    "hd95": "medpy hd95: surface = mask XOR erosion by the 4-neighbour cross (outside = background), Euclidean "
    "distances, numpy 95th percentile of both directed distance sets pooled; pixels",
    "empty_masks": "both empty: dice = iou = 1, hd95 = 0; one empty: dice = iou = 0, hd95 = image diagonal",
    "std": "population std over images",
}


def network_stride(model: torch.nn.Module) -> int:
    """The network's largest down-sampling factor, from the `strides` its encoders list (U-Net 16,
    DeepLabv3+ at output stride 8: 8, a ResNet without dilation: 32); 32 when none lists any."""
    found = [s for m in model.modules() for s in getattr(m, "strides", ()) if isinstance(s, int)]
    return max(found, default=32)


def _probabilities(out: dict) -> dict:
    """(B, 2, H, W) background/lesion probabilities from a softmax (`pred`) or sigmoid
    (`mask_logits`) head, and class probabilities of a classification head."""
    if "pred" in out:
        prob = torch.softmax(out["pred"], 1)
    else:
        p = torch.sigmoid(out["mask_logits"][:, :1])
        prob = torch.cat([1 - p, p], 1)
    res = {"prob": prob}
    if "cls" in out:
        res["cls"] = torch.softmax(out["cls"], 1)
    return res


def _forward(model, x: torch.Tensor, stride: int) -> dict:
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, (-w) % stride, 0, (-h) % stride))
    res = _probabilities(model(padded))
    res["prob"] = res["prob"][..., :h, :w]
    return res


def _starts(size: int, tile: int, step: int) -> list[int]:
    starts = list(range(0, size - tile + 1, step))
    return starts if starts[-1] == size - tile else [*starts, size - tile]


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, window: int = 0, fov: int = 0) -> dict:
    """x (B, 1, H, W) grayscale in [0, 1], any H and W → {"prob": (B, 2, H, W) class
    probabilities at the input size, "cls": (B, K) when the network classifies}. window > 0:
    tiles of window² (rounded up to the stride) at half-window steps for images larger than that,
    probabilities averaged where tiles overlap (classification: averaged over the tiles). fov > 0:
    the image resized (aspect kept) to a longer side of fov as in training (data.SegDataset), the
    probabilities resized back to H × W."""
    h, w = x.shape[-2:]
    size = augment.fov_size(h, w, fov)
    if size != (h, w):
        res = predict(model, F.interpolate(x, size=size, mode="bilinear", align_corners=False), window)
        res["prob"] = F.interpolate(res["prob"], size=(h, w), mode="bilinear", align_corners=False)
        return res
    model.eval()
    stride = network_stride(model)
    h, w = x.shape[-2:]
    if not window or max(h, w) <= window:
        return _forward(model, x, stride)
    tile = -(-window // stride) * stride
    step = max(stride, tile // 2 // stride * stride)
    hp, wp = h + (-h) % stride, w + (-w) % stride
    x = F.pad(x, (0, wp - w, 0, hp - h))
    th, tw = min(tile, hp), min(tile, wp)
    prob = torch.zeros(x.shape[0], 2, hp, wp, device=x.device)
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    cls = []
    for y in _starts(hp, th, step):
        for x0 in _starts(wp, tw, step):
            part = _forward(model, x[..., y : y + th, x0 : x0 + tw], stride)
            prob[..., y : y + th, x0 : x0 + tw] += part["prob"]
            count[..., y : y + th, x0 : x0 + tw] += 1
            if "cls" in part:
                cls.append(part["cls"])
    res = {"prob": (prob / count)[..., :h, :w]}
    if cls:
        res["cls"] = torch.stack(cls).mean(0)
    return res


@torch.no_grad()
def predict_masks(model: torch.nn.Module, images: torch.Tensor, window: int = 0, fov: int = 0) -> torch.Tensor:
    """(B, 1, H, W) images → (B, H, W) binary lesion masks at the same size."""
    return predict(model, images, window, fov)["prob"].argmax(1)


def image_tensor(img: np.ndarray, device="cpu") -> torch.Tensor:
    """A uint8 (H, W) image as the (1, 1, H, W) float input in [0, 1] the networks take."""
    return torch.from_numpy(img.copy()).float().div_(255)[None, None].to(device)


def _bar(total: int, desc: str, show: bool):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=None)  # None: only on a terminal


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    items: list[data.Item],
    *,
    device="cpu",
    window: int = 0,
    fov: int = 0,
    synthetic_size: int = 128,
    overlay_dir: str | None = None,
    overlays: int = 8,
    progress: bool = False,
) -> dict:
    """Per-image metrics of `model` on `items`, each image at its original size (synthetic items:
    generated at synthetic_size²; `fov`: predicted as :func:`predict` does, scored at that size).
    Returns {"per_image": rows (name, height, width, metrics), "summary": {metric: (mean, std)},
    "classification": ... for classifying networks, "empty_predictions" / "lesion_images": how
    many images have no predicted / true lesion pixel}. No image, or a model whose output is not
    finite, is an error (either would score as a number)."""
    if not items:
        raise UserError("nothing to evaluate: the set of images is empty")
    rows, probs, classes, empty, lesions = [], [], [], 0, 0
    bar = _bar(len(items), "evaluating", progress)
    for i, item in enumerate(items):
        img, mask = data.load_item(item, synthetic_size)
        if mask is None:
            raise UserError(f"cannot evaluate on {item.name}: it has no mask")
        res = predict(model, image_tensor(img, device), window, fov)
        if not torch.isfinite(res["prob"]).all():
            raise UserError(
                f"the model's output on {item.name} is NaN or infinite (its weights or batch-norm statistics hold "
                "non-finite values); it cannot be scored"
            )
        pred = res["prob"].argmax(1)[0].cpu()
        empty += not bool(pred.any())
        lesions += bool(mask.any())
        row = {"name": item.name, "height": img.shape[0], "width": img.shape[1]}
        row.update(metrics.seg_metrics(pred, torch.from_numpy(mask).long()))
        rows.append(row)
        if "cls" in res:
            probs.append(res["cls"][0].cpu())
            classes.append(item.cls)
        if overlay_dir and i < overlays:
            stem = os.path.splitext(os.path.basename(item.name))[0]
            picture = visualize.overlay(img, pred.numpy(), mask)
            visualize.save_png(visualize.enlarge(picture), os.path.join(overlay_dir, f"{stem}.png"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = {"per_image": rows, "summary": metrics.summarize(rows), "empty_predictions": empty, "lesion_images": lesions}
    if probs:
        y, p = torch.tensor(classes), torch.stack(probs)
        known = y >= 0
        if known.any() and (y[known] < p.shape[1]).all():
            out["classification"] = metrics.cls_metrics(y[known], p[known])
    return out


@torch.no_grad()
def pseudo_label_quality(
    model, items, keep=None, *, device="cpu", fov: int = 0, synthetic_size: int = 128
) -> dict[str, float]:
    """Diagnosis only (never used for training): the model's pseudo-labels (argmax, whole image) on
    `items` against their masks. pl_dice: mean per-image Dice; pl_acc: pixel accuracy; when
    `keep(prob, cls)` gives a (B, H, W) bool mask (the pixels a method's unsupervised loss counts;
    None: no filter): pl_kept, the share of pixels kept, and pl_kept_acc, the accuracy on them."""
    dice, n_pix, n_correct, n_kept, n_kept_correct, filtered = [], 0, 0, 0, 0, False
    for item in items:
        img, mask = data.load_item(item, synthetic_size)
        res = predict(model, image_tensor(img, device), fov=fov)
        pl = res["prob"].argmax(1).cpu()
        gt = torch.from_numpy(mask).long()[None]
        dice.append(metrics.seg_metrics(pl[0], gt[0])["dice"])
        correct = pl == gt
        n_pix += correct.numel()
        n_correct += int(correct.sum())
        kept = keep(res["prob"], res.get("cls")) if keep is not None else None
        if kept is not None:
            filtered = True
            kept = kept.cpu()
            n_kept += int(kept.sum())
            n_kept_correct += int((correct & kept).sum())
    out = {"pl_dice": float(np.mean(dice)), "pl_acc": n_correct / max(1, n_pix)}
    if filtered:
        out["pl_kept"] = n_kept / max(1, n_pix)
        out["pl_kept_acc"] = n_kept_correct / n_kept if n_kept else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# Result files


def write_results(res: dict, out: str, method: str = "") -> None:
    """test_per_image.csv (name, height, width, metrics) and test_metrics.json (mean ± std, the
    conventions used, classification metrics when present) in `out`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "test_per_image.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["name", "height", "width", *metrics.SEG_KEYS])
        w.writeheader()
        w.writerows(res["per_image"])
    summary = {
        "method": method,
        "n": len(res["per_image"]),
        **{k: {"mean": m, "std": s} for k, (m, s) in res["summary"].items()},
        "conventions": CONVENTIONS,
    }
    if "classification" in res:
        summary["classification"] = res["classification"]
    with open(os.path.join(out, "test_metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)


def read_per_image(run: str) -> dict[str, dict[str, float]]:
    """{image name: {metric: value}} from a run folder's test_per_image.csv (or the CSV itself)."""
    path = run if run.endswith(".csv") else os.path.join(run, "test_per_image.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found (run `busseg train` or `busseg eval` first)")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in metrics.SEG_KEYS if rows and k not in rows[0]]
    if not rows or missing:
        raise UserError(f"{path}: no per-image rows" if not rows else f"{path}: columns {missing} missing")
    return {r["name"]: {k: float(r[k]) for k in metrics.SEG_KEYS} for r in rows}


def expand_runs(patterns: list[str], what: str) -> list[str]:
    """Run folders (or CSV files) from paths and glob patterns, each pattern sorted, duplicates once."""
    runs = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not hits:
            raise UserError(f"{what}: the pattern {pat!r} matches nothing")
        runs += [h for h in hits if h not in runs]
    return runs


def compare_groups(runs_a: list[str], runs_b: list[str]) -> dict:
    """Two groups of runs (e.g. the seeds of two methods) on the test images they all share: per run
    the mean of each metric, then mean ± std (n − 1) over the group's runs; the Wilcoxon
    signed-rank test (scipy) of B − A on per-image Dice averaged over each group's runs."""
    tables = {r: read_per_image(r) for r in [*runs_a, *runs_b]}
    names = sorted(set.intersection(*(set(t) for t in tables.values())))
    if not names:
        raise UserError("compare: the runs share no test images")

    def group(runs):
        per_run = {k: [float(np.mean([tables[r][n][k] for n in names])) for r in runs] for k in metrics.SEG_KEYS}
        stats = {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for k, v in per_run.items()}
        dice = [float(np.mean([tables[r][n]["dice"] for r in runs])) for n in names]
        return stats, dice

    (stats_a, dice_a), (stats_b, dice_b) = group(runs_a), group(runs_b)
    stat, p = metrics.wilcoxon(dice_b, dice_a)
    return {
        "a": {"runs": list(runs_a), "metrics": stats_a},
        "b": {"runs": list(runs_b), "metrics": stats_b},
        "n_images": len(names),
        "wilcoxon": {"statistic": stat, "p": p},
        "dice_diff": float(np.mean(dice_b) - np.mean(dice_a)),
    }


def format_comparison(res: dict) -> str:
    """The comparison as text: both groups named by their runs, one line per metric."""

    def fmt(v, k):
        digits = 2 if k == "hd95" else 4
        return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

    a, b = res["a"], res["b"]
    lines = [
        f"A: {len(a['runs'])} run(s): {', '.join(a['runs'])}",
        f"B: {len(b['runs'])} run(s): {', '.join(b['runs'])}",
        f"{res['n_images']} common test images; mean ± std over runs (std with n − 1; 0 for one run)",
        f"{'metric':12s} {'A':>20s} {'B':>20s}",
    ]
    for k in metrics.SEG_KEYS:
        lines.append(f"{k:12s} {fmt(a['metrics'][k], k):>20s} {fmt(b['metrics'][k], k):>20s}")
    w = res["wilcoxon"]
    lines.append(
        f"Wilcoxon signed-rank on per-image Dice (each group averaged over its runs), B − A "
        f"{res['dice_diff']:+.4f}: statistic {w['statistic']:.1f}, p = {w['p']:.4g}"
    )
    return "\n".join(lines)
