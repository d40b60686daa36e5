import math

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
    assert metrics.seg_metrics(empty, empty)["dice"] == 1
    assert metrics.seg_metrics(empty, gt)["dice"] == 0
    assert math.isclose(metrics.seg_metrics(empty, gt)["hd95"], math.hypot(20, 20))
    ign = gt.clone()
    ign[:, 12:] = 255  # ignored pixels count nowhere
    pred2 = gt.clone()
    pred2[:, 12:] = 1
    assert metrics.seg_metrics(pred2, ign)["dice"] == 1


def test_wilcoxon_matches_scipy_reference_values():
    # scipy.stats.wilcoxon documentation example: exact distribution.
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    stat, p = metrics.wilcoxon(d)
    assert stat == 24 and math.isclose(p, 0.041259765625)
    _, pg = metrics.wilcoxon(d, alternative="greater")
    assert math.isclose(pg, 0.0206298828125)
    # Normal approximation (n > 50): symmetric differences → p near 1; shifted → tiny p.
    x = torch.linspace(-1, 1, 101)
    assert metrics.wilcoxon(x)[1] > 0.9
    assert metrics.wilcoxon(x + 0.5)[1] < 1e-6
    assert metrics.wilcoxon([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0)


def test_classification_metrics():
    y = torch.tensor([0, 0, 1, 1, 1])
    prob = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.7, 0.3]])
    r = metrics.cls_metrics(y, prob)
    assert math.isclose(r["accuracy"], 4 / 5) and math.isclose(r["precision"], 1.0)
    assert math.isclose(r["recall"], 2 / 3) and math.isclose(r["f1"], 0.8)
    assert math.isclose(r["auc"], 5 / 6)  # pairs ordered correctly: 5 of 6
