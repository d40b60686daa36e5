"""Whole-image evaluation (each image at its original size), sliding windows, the pseudo-label
check, the trainer's use of both, and the comparison of groups of runs."""

import csv
import json
import os

import numpy as np
import pytest
import scipy.stats
import torch
from train_helpers import tiny

from busseg_ops import models
from busseg_ops.train import Trainer, cli, data, engine, evaluate, methods, metrics, visualize
from busseg_ops.train.errors import UserError

SIZES = [(37, 53), (61, 29)]  # (H, W): two sizes, neither square nor a multiple of any stride


class DarkIsLesion(torch.nn.Module):
    """A fixed 'network': lesion where the image is darker than 0.5. Records the inputs it sees."""

    strides = [8]

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return {"pred": torch.cat([x - 0.5, 0.5 - x], 1) * 10}


def _write_folder(tmp_path, n_per_size=3):
    """Images whose dark rectangle is 3 px to the right of the mask's rectangle, two sizes."""
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    truth = {}
    rng = np.random.RandomState(0)
    for i in range(n_per_size * len(SIZES)):
        h, w = SIZES[i % len(SIZES)]
        y, x = rng.randint(2, h // 2), rng.randint(2, w // 2 - 3)
        rh, rw = rng.randint(5, h // 2), rng.randint(5, w // 2)
        img = np.full((h, w), 200, np.uint8)
        img[y : y + rh, x + 3 : x + 3 + rw] = 40
        mask = np.zeros((h, w), np.uint8)
        mask[y : y + rh, x : x + rw] = 255
        name = f"case{i:02d}.png"
        visualize.save_png(img, str(img_dir / name))
        visualize.save_png(mask, str(mask_dir / name))
        truth[name] = (img < 128, mask > 0)
    return str(img_dir), str(mask_dir), truth


def test_metrics_at_each_images_original_size(tmp_path):
    img_dir, mask_dir, truth = _write_folder(tmp_path)
    items = data.folder_items(img_dir, mask_dir)
    model = DarkIsLesion()
    res = evaluate.evaluate(model, items, overlay_dir=str(tmp_path / "ov"), overlays=2)
    assert len(res["per_image"]) == len(truth)
    for row in res["per_image"]:
        pred, gt = truth[row["name"]]
        assert (row["height"], row["width"]) == pred.shape and pred.shape in SIZES
        want = metrics.seg_metrics(torch.from_numpy(pred), torch.from_numpy(gt).long())
        for k in metrics.SEG_KEYS:
            assert row[k] == pytest.approx(want[k]), k
        assert row["hd95"] == pytest.approx(3.0)  # the 3 px shift, in original pixels
    # Batch 1, grayscale, padded to the stride (8); overlays at the original size (enlarged ×k).
    assert {s[:2] for s in model.seen} == {(1, 1)}
    assert {s[2:] for s in model.seen} == {(40, 56), (64, 32)}
    assert sorted(os.listdir(tmp_path / "ov")) == ["case00.png", "case01.png"]
    summary = res["summary"]["dice"][0]
    assert summary == pytest.approx(np.mean([r["dice"] for r in res["per_image"]]))


def test_real_networks_keep_the_input_size_and_strides():
    unet = models.UNet(2, in_channels=1, base=4, rep_dim=8, proj_dim=8)
    deeplab = models.DeepLabV3Plus(2, backbone="resnet18", in_channels=1, rep_dim=8, proj_dim=8)
    lanet = models.LANet(2, backbone="resnet18", in_channels=1)
    assert [evaluate.network_stride(m) for m in (unet, deeplab, lanet)] == [16, 8, 32]
    x = torch.rand(1, 1, 37, 53)
    for m in (unet, deeplab, lanet):
        assert evaluate.predict_masks(m, x).shape == (1, 37, 53)
    assert "cls" in evaluate.predict(lanet, x)


def test_sliding_window_matches_whole_image_for_a_pixelwise_network():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 1)

    class Pixelwise(torch.nn.Module):
        strides = [16]

        def __init__(self):
            super().__init__()
            self.net, self.seen = net, []

        def forward(self, x):
            self.seen.append(tuple(x.shape[-2:]))
            return {"pred": self.net(x) * 5}

    m = Pixelwise()
    x = torch.rand(2, 1, 75, 130)
    whole = evaluate.predict(m, x)["prob"]
    m.seen.clear()
    # Tiles of 48 (40 rounded up to the stride) at steps of 16 over the padded 80 × 144: 3 × 7 tiles.
    tiled = evaluate.predict(m, x, window=40)["prob"]
    assert tiled.shape == whole.shape == (2, 2, 75, 130)
    torch.testing.assert_close(tiled, whole)
    assert set(m.seen) == {(48, 48)} and len(m.seen) == 3 * 7
    # An image smaller than the window goes through whole.
    m.seen.clear()
    evaluate.predict(m, torch.rand(1, 1, 30, 20), window=40)
    assert m.seen == [(32, 32)]


def test_pseudo_label_check_and_method_filters(tmp_path):
    img_dir, mask_dir, truth = _write_folder(tmp_path, n_per_size=2)
    items = data.folder_items(img_dir, mask_dir)
    model = DarkIsLesion()
    ra = methods.build(tiny(tmp_path, method="rabusseg", drop_percent=70.0))
    at_half = {"epoch": 5, "epochs": 10}  # U2PL's schedule: (100 − 70) · (1 − 5/10) = 15 % dropped
    q = evaluate.pseudo_label_quality(model, items, lambda p, c: ra.pseudo_label_keep(p, c, at_half))
    dice = [metrics.seg_metrics(torch.from_numpy(p), torch.from_numpy(g).long())["dice"] for p, g in truth.values()]
    assert q["pl_dice"] == pytest.approx(np.mean(dice))
    n = sum(p.size for p, _ in truth.values())
    assert q["pl_acc"] == pytest.approx(sum((p == g).sum() for p, g in truth.values()) / n)
    kept_expected = sum(p.size - int(0.15 * p.size) for p, _ in truth.values()) / n  # 15 % dropped per image
    assert q["pl_kept"] == pytest.approx(kept_expected)
    assert 0 <= q["pl_kept_acc"] <= 1
    # Filters: PH-Net's code-form L_u (default) keeps what rabusseg's does, its paper form confidence ≥ γ;
    # suponly has none (no pl_kept columns).
    prob = torch.softmax(torch.randn(2, 2, 9, 7), 1)
    ph = methods.build(tiny(tmp_path, method="phnet", gamma=0.7, drop_percent=70.0))
    assert torch.equal(ph.pseudo_label_keep(prob, None, at_half), ra.pseudo_label_keep(prob, None, at_half))
    ph = methods.build(tiny(tmp_path, method="phnet", gamma=0.7, unsup_form="paper"))
    assert torch.equal(ph.pseudo_label_keep(prob, None, {}), prob.amax(1) >= 0.7)
    sup = methods.build(tiny(tmp_path, method="suponly"))
    assert set(evaluate.pseudo_label_quality(model, items, lambda p, c: sup.pseudo_label_keep(p, c, {}))) == {
        "pl_dice",
        "pl_acc",
    }


def _with_lists(tmp_path):
    """A folder dataset with split lists (test 6, 1/2 labelled 9 + unlabelled 9), two image sizes."""
    img_dir, mask_dir, truth = _write_folder(tmp_path, n_per_size=12)
    names = sorted(truth)
    lists = tmp_path / "lists"
    (lists / "1_2").mkdir(parents=True)
    (lists / "test.txt").write_text("\n".join(names[:6]))
    (lists / "1_2" / "labeled.txt").write_text("\n".join(names[6:15]))
    (lists / "1_2" / "unlabeled.txt").write_text("\n".join(names[15:]))
    return img_dir, mask_dir, str(lists), truth


def test_trainer_tests_at_original_size_with_a_carved_validation_split(tmp_path):
    img_dir, mask_dir, lists, truth = _with_lists(tmp_path)
    cfg = tiny(
        tmp_path,
        method="rabusseg",
        cra=False,  # its filter is the point here; CRA only costs time
        data="folder",
        root=img_dir,
        mask_dir=mask_dir,
        split_dir=lists,
        partition="1/4",
        val_from_train=3,
        pseudo_label_check=4,
        epochs=1,
    )
    tr = Trainer(cfg)
    sp = tr.splits
    test_names = {it.name for it in sp.test}
    assert len(sp.val) == 3 and not {it.name for it in sp.val} & (test_names | {it.name for it in sp.unlabeled})
    assert len(sp.labeled) == 4 and len(sp.unlabeled) == 18 - 4 - 3
    with pytest.raises(UserError, match="--val-from-train 14"):
        data.make_splits("folder", img_dir, "1/4", 0, lists, mask_dir=mask_dir, val_count=14)
    tr.fit()
    with open(os.path.join(cfg.out, "test_per_image.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows} == test_names
    for r in rows:
        assert (int(r["height"]), int(r["width"])) == truth[r["name"]][0].shape
    summary = json.load(open(os.path.join(cfg.out, "test_metrics.json")))
    assert "image diagonal" in summary["conventions"]["empty_masks"]
    with open(os.path.join(cfg.out, "metrics.csv")) as f:
        log = list(csv.DictReader(f))
    assert {"pl_dice", "pl_kept", "pl_kept_acc", "val_dice"} <= set(log[0])
    assert float(log[0]["pl_kept"]) == pytest.approx(0.8, abs=0.01)  # epoch 0: drop_percent 80 drops 20 %
    # `busseg eval` on the validation split, with a sliding window.
    assert cli.main(["eval", "--checkpoint", os.path.join(cfg.out, "best.pt"), "--split", "val", "--window", "32"]) == 0
    with open(os.path.join(cfg.out, "eval", "test_per_image.csv")) as f:
        assert {r["name"] for r in csv.DictReader(f)} == {it.name for it in sp.val}


def _fake_run(path, dice: dict[str, float]):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "test_per_image.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["name", "height", "width", *metrics.SEG_KEYS])
        w.writeheader()
        for name, d in dice.items():
            w.writerow({"name": name, "height": 10, "width": 12, **{k: d for k in metrics.SEG_KEYS}})


def test_compare_groups_of_seeds(tmp_path, capsys):
    rng = np.random.RandomState(0)
    names = [f"img{i}" for i in range(20)]
    a = {s: dict(zip(names, rng.rand(20).round(2))) for s in range(2)}
    b = {s: dict(zip(names, (rng.rand(20) * 0.5 + 0.4).round(2))) for s in range(3)}
    for s, d in a.items():
        _fake_run(tmp_path / "sup" / f"seed{s}", d)
    for s, d in b.items():
        _fake_run(tmp_path / "ra" / f"seed{s}", {**d, "only_here.png": 0.5})  # not common: left out
    res = evaluate.compare_groups(
        [str(tmp_path / "sup" / f"seed{s}") for s in a], [str(tmp_path / "ra" / f"seed{s}") for s in b]
    )
    per_run_b = [np.mean([b[s][n] for n in names]) for s in b]
    assert res["n_images"] == 20
    assert res["b"]["metrics"]["dice"] == pytest.approx((np.mean(per_run_b), np.std(per_run_b, ddof=1)))
    mean_a = [np.mean([a[s][n] for s in a]) for n in names]
    mean_b = [np.mean([b[s][n] for s in b]) for n in names]
    assert res["wilcoxon"]["p"] == pytest.approx(scipy.stats.wilcoxon(mean_b, mean_a).pvalue)
    # CLI: globs, both groups named; the two-run form still works.
    assert cli.main(["compare", str(tmp_path / "sup" / "seed*"), "--vs", str(tmp_path / "ra" / "seed*")]) == 0
    out = capsys.readouterr().out
    assert "A: 2 run(s)" in out and "B: 3 run(s)" in out and str(tmp_path / "ra" / "seed2") in out
    assert f"p = {res['wilcoxon']['p']:.4g}" in out
    assert cli.main(["compare", str(tmp_path / "sup" / "seed0"), str(tmp_path / "ra" / "seed0")]) == 0
    assert "20 common test images" in capsys.readouterr().out


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    _fake_run(tmp_path / "x", {"a.png": 0.5})
    _fake_run(tmp_path / "y", {"b.png": 0.5})
    cases = [
        (["compare", str(tmp_path / "x"), str(tmp_path / "nowhere")], "nowhere"),
        (["compare", str(tmp_path / "x"), "--vs", str(tmp_path / "z*")], "matches nothing"),
        (["compare", str(tmp_path / "x"), str(tmp_path / "y")], "share no test images"),
        (["compare", str(tmp_path / "x")], "two runs"),
        (["eval", "--checkpoint", str(tmp_path / "none.pt")], "--checkpoint"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("busseg: error:") and words in err and "\n" not in err, err


class Constant(torch.nn.Module):
    """A 'network' whose logits are one value per class everywhere (NaN to stand for broken weights)."""

    strides = [8]

    def __init__(self, background: float, lesion: float):
        super().__init__()
        self.logits = (background, lesion)

    def forward(self, x):
        b, _, h, w = x.shape
        return {"pred": torch.tensor(self.logits).view(1, 2, 1, 1).expand(b, 2, h, w)}


def test_all_background_predictions_warn_and_say_why(tmp_path):
    img_dir, mask_dir, _ = _write_folder(tmp_path)
    items = data.folder_items(img_dir, mask_dir)
    res = evaluate.evaluate(Constant(1.0, 0.0), items)
    assert res["summary"]["dice"][0] == 0 and res["empty_predictions"] == res["lesion_images"] == len(items)
    cfg = tiny(tmp_path, criterion="ohem", ema=0.99)
    warning = engine.background_warning(res, cfg)
    assert f"no lesion pixel predicted on any of the {len(items)} images" in warning
    assert "--criterion ohem" in warning and "(--ema 0.99)" in warning and "--ema 0.9 --criterion ce+dice" in warning
    assert engine.background_warning(evaluate.evaluate(DarkIsLesion(), items), cfg) is None


def test_a_nan_model_is_an_error_not_dice_0(tmp_path):
    img_dir, mask_dir, _ = _write_folder(tmp_path)
    items = data.folder_items(img_dir, mask_dir)
    with pytest.raises(UserError, match=r"output on case00.png is NaN or infinite"):
        evaluate.evaluate(Constant(float("nan"), 0.0), items)
    with pytest.raises(UserError, match="the set of images is empty"):
        evaluate.evaluate(DarkIsLesion(), [])  # an empty test list wrote NaN metrics


def test_curves_draw_a_single_point_and_leave_empty_series_out(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    visualize._series(ax, [(1, "0.5")], "one point")
    visualize._series(ax, [(1, ""), (2, "nan")], "nothing")
    visualize._series(ax, [(1, "0.5"), (2, "0.4")], "two points")
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"one point", "two points"}  # an empty series is neither drawn nor in the legend
    assert lines["one point"].get_marker() == "o" and lines["two points"].get_marker() in ("None", None, "")
    plt.close(fig)
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,lr,loss_s,loss,val_dice\n1,2,0.01,0.8,0.8,0.1\n")
    assert os.path.isfile(visualize.plot_curves(str(path), str(tmp_path / "curves.png")))
