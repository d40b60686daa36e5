"""Issue 30's differences from the public code (docs/upstream_audit.md), each pinned: OHEM's min_kept
scaled to the batch, the teacher's train-mode forward and own BatchNorm statistics, PH-Net's L_u
and HPC inputs as its released code, APA's easy_easy mixing and constant shield, and the field of
view option. Tiny synthetic inputs on the CPU."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_methods import _batch, oracle_teacher
from train_helpers import tiny

from busseg_ops.train import Trainer, augment, data, engine, evaluate, methods

CTX = {"epoch": 1, "progress": 0.5, "warmup": False, "epochs": 2}


def test_ohem_min_kept_is_upstreams_share_of_the_batch(tmp_path):
    # Upstream: 100000 of a batch of 2 crops of 512² (19 %); a 4 × 128² batch keeps 12500 at least.
    cfg = tiny(tmp_path, criterion="ohem")
    assert methods.ohem_min_kept(cfg, torch.zeros(4, 128, 128)) == 12500
    assert methods.ohem_min_kept(cfg, torch.zeros(2, 512, 512)) == 100000
    cfg.ohem_scale = False
    assert methods.ohem_min_kept(cfg, torch.zeros(4, 128, 128)) == 100000
    # Scaled, OHEM drops the easy pixels of a 2 × 64² batch; unscaled, it keeps all of them (plain CE).
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 64, 64) * 3, torch.randint(0, 2, (2, 64, 64))
    keep = methods.ohem_keep(logits, target, 0.7, methods.ohem_min_kept(tiny(tmp_path, criterion="ohem"), target))
    assert 1562 <= int(keep.sum()) < target.numel()
    assert bool(methods.ohem_keep(logits, target, 0.7, 100000).all())


def test_unreliable_filtered_ce_is_u2pls_compute_unsupervised_loss():
    # U2PL / PH-Net loss_helper: drop pixels with entropy >= the percentile, weight = all / kept,
    # loss = weight * sum(CE over kept) / kept.
    torch.manual_seed(1)
    pred, prob = torch.randn(2, 2, 9, 11), torch.softmax(torch.randn(2, 2, 9, 11) * 2, 1)
    target = prob.argmax(1)
    target[0, :2] = 255
    got = methods.unreliable_filtered_ce(pred, target, prob, 30.0)
    entropy = -(prob * torch.log(prob + 1e-10)).sum(1)
    valid = target != 255
    n_drop = int(0.3 * int(valid.sum()))
    cut = entropy[valid].sort(descending=True).values[n_drop - 1]
    kept = valid & (entropy < cut)
    assert int(kept.sum()) == int(valid.sum()) - n_drop  # continuous entropies: no ties
    ce = F.cross_entropy(pred, target.masked_fill(~kept, 255), ignore_index=255, reduction="none")
    expected = target.numel() / kept.sum() * ce.sum() / kept.sum()
    torch.testing.assert_close(got, expected)


class BNTeacher(torch.nn.Module):
    """A BatchNorm teacher that records the mode and the batch of every call."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(1)
        self.calls = []

    def forward(self, x, need_rep=False, **flags):
        self.calls.append((self.training, x.clone(), need_rep))
        y = self.bn(x)
        out = {"pred": torch.cat([y, -y], 1) * 3}
        if need_rep:
            out["rep"] = F.normalize(torch.cat([torch.cos(k * x) for k in range(1, 17)], 1), dim=1)
        return out


@pytest.mark.parametrize("method", ["rabusseg", "phnet"])
def test_teacher_second_forward_runs_in_train_mode_on_the_students_batch(tmp_path, method):
    # U2PL train_semi.py: pseudo-labels from the eval-mode teacher on the unlabelled images, then
    # model_teacher.train() on cat(labelled, augmented unlabelled): its BN statistics update.
    for train_mode in (True, False):
        cfg = tiny(tmp_path, method=method, teacher_train_mode=train_mode, cra=False, arp=False)
        torch.manual_seed(0)
        student, teacher, m = engine.build_model(cfg), BNTeacher().eval(), methods.build(cfg)
        lab, unl = _batch(2, 1), _batch(2, 2, labeled=False)
        torch.manual_seed(0)
        m(student.train(), teacher, lab, unl, CTX)
        assert not teacher.training  # back in eval mode for evaluation
        modes = [c[0] for c in teacher.calls]
        assert torch.equal(teacher.calls[0][1], unl["image"])  # the pseudo-labels: eval mode, raw images
        if method == "rabusseg" and not train_mode:  # the pseudo-labelling forward's entropy, as before
            assert modes == [False]
        else:
            assert modes == [False, train_mode]
            second = teacher.calls[1][1]
            assert second.shape[0] == 4 and torch.equal(second[:2], lab["image"])
        moved = not torch.equal(teacher.bn.running_mean, torch.zeros(1))
        assert moved == train_mode
        if method == "phnet":  # HPC (code form): the teacher's features of the labelled images
            assert teacher.calls[1][2] is True


def test_engine_ema_keeps_the_teachers_own_bn_statistics(tmp_path):
    for train_mode, method in ((True, "rabusseg"), (False, "rabusseg"), (True, "suponly")):
        tr = Trainer(tiny(tmp_path / f"{train_mode}{method}", method=method, teacher_train_mode=train_mode))
        bn_t = next(m for m in tr.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn_s = next(m for m in tr.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn_t.running_mean.fill_(1.0)
        bn_s.running_mean.fill_(3.0)
        before = next(tr.teacher.parameters()).clone()
        with torch.no_grad():
            next(tr.student.parameters()).add_(1.0)
        tr.global_step = 5  # past the ramp's first step: a teacher between its own and the student's
        tr._ema_update()
        assert not torch.equal(next(tr.teacher.parameters()), before)  # parameters: always averaged
        own = train_mode and method != "suponly"  # suponly never runs its teacher: EMA statistics
        assert bool((bn_t.running_mean == 1.0).all()) == own, (train_mode, method)


def test_phnet_code_form_loss_u_and_filter(tmp_path):
    # unsup_form code: PH-Net's deleted loss_helper.py (U2PL's entropy filter and weight) on the
    # train-mode teacher's probabilities of the mixed images; the diagnosis filter follows it.
    cfg = tiny(tmp_path, method="phnet", hpc=False, apa=False, cutmix_p=0.0, dropout=False)
    torch.manual_seed(0)
    student, m = engine.build_model(cfg), methods.build(cfg)
    lab, unl = _batch(2, 1), _batch(2, 2, labeled=False)
    _, logs = m(student.train(), oracle_teacher, lab, unl, CTX)
    with torch.no_grad():
        pred = student(torch.cat([lab["image"], unl["image"]]))["pred"][2:]
        prob = torch.softmax(oracle_teacher(unl["image"])["pred"], 1)
    drop = methods.unreliable_percent(cfg.pseudo.drop_percent, 1, 2)
    expected = methods.unreliable_filtered_ce(pred, prob.argmax(1), prob, drop)
    torch.testing.assert_close(logs["loss_u"], expected)
    keep = m.pseudo_label_keep(prob, None, CTX)
    assert 0.85 < float(keep.float().mean()) < 0.95  # 10 % of each image dropped at epoch 1 of 2
    cfg.phnet.unsup_form = "paper"
    assert torch.equal(m.pseudo_label_keep(prob, None, CTX), prob.amax(1) >= cfg.pseudo.gamma)


def test_easy_patch_swap_replaces_the_easiest_patches_with_the_next_images():
    # PH-Net generate_patch_data, easy_easy: round(0.4·N²) + 1 easiest patches of image b take
    # the easiest patches of image b+1, both in raster order; the harder ones stay.
    n, b = 3, 3
    hardness = torch.rand(b, n, n, generator=torch.Generator().manual_seed(0))
    img = torch.arange(b * 2 * 6 * 6, dtype=torch.float32).reshape(b, 2, 6, 6)
    lab = torch.arange(b * 6 * 6).reshape(b, 6, 6)
    mixed_img, mixed_lab = augment.easy_patch_swap([img, lab], hardness)
    m = round(0.4 * n * n) + 1
    for i in range(b):
        easy = sorted(hardness[i].flatten().argsort()[:m].tolist())
        src = sorted(hardness[(i + 1) % b].flatten().argsort()[:m].tolist())
        for p in range(n * n):
            r, c = divmod(p, n)
            if p in easy:
                q = src[easy.index(p)]
                j, (rs, cs) = (i + 1) % b, divmod(q, n)
            else:
                j, rs, cs = i, r, c
            want_img = img[j, :, 2 * rs : 2 * rs + 2, 2 * cs : 2 * cs + 2]
            assert torch.equal(mixed_img[i, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2], want_img)
            assert torch.equal(
                mixed_lab[i, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2], lab[j, 2 * rs : 2 * rs + 2, 2 * cs : 2 * cs + 2]
            )
    one = augment.easy_patch_swap([img[:1]], hardness[:1])[0]
    assert torch.equal(one, img[:1])


@pytest.mark.parametrize("apa_mix", ["easy_rand", "ramp"])
def test_apa_shield_constant_or_ramping(tmp_path, apa_mix):
    # easy_rand (released code): the N² − round(N²·0.7) hardest patches never mix, from the first
    # epoch on; ramp (the paper's Eq. 5): at t = 0 nothing is shielded.
    cfg = tiny(tmp_path, method="phnet", apa_mix=apa_mix, num_patches=4)
    m = methods.build(cfg)
    hardness = torch.arange(16.0).reshape(1, 4, 4).repeat(2, 1, 1)
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    mixed_hard = torch.zeros(16)
    for seed in range(30):
        torch.manual_seed(seed)
        (xm,) = m.patch_mix([x], hardness, {"progress": 0.0})
        changed = (xm[0, 0].reshape(4, 2, 4, 2).amax((1, 3)) > 0).flatten()
        mixed_hard += changed.float()
    hardest = mixed_hard[-5:]  # k = 16 − round(11.2) = 5
    if apa_mix == "easy_rand":
        assert hardest.sum() == 0 and mixed_hard[:11].sum() > 0
    else:
        assert hardest.sum() > 0


def test_fov_resizes_before_the_crop_and_back_at_evaluation():
    assert augment.fov_size(200, 320, 128) == (80, 128)
    assert augment.fov_size(320, 100, 64) == (64, 20)
    assert augment.fov_size(37, 53, 0) == (37, 53)
    # Python's rounding (half to even), in integer arithmetic: 250 · 144 / 320 = 112.5 → 112
    assert augment.fov_size(250, 320, 144) == (112, 144) and augment.fov_size(320, 227, 320) == (320, 227)
    for h, w, fov in [(h, w, fov) for fov in (48, 144) for h in range(1, 200, 7) for w in range(1, 330, 3)]:
        assert augment.fov_size(h, w, fov) == tuple(max(1, round(s * fov / max(h, w))) for s in (h, w)), (h, w, fov)
    items = data.synthetic_items(2, 0)
    kw = dict(train=True, synthetic_size=96, scale=(1.0, 1.0), flip=False)
    ds = data.SegDataset(items, 48, fov=48, **kw)
    sample = ds[0]
    # scale 1 and a crop of the fov's size: the whole image, resized
    img, mask = ds.raw(0)
    whole, whole_mask = augment.resize(torch.from_numpy(img).float()[None] / 255, torch.from_numpy(mask).long(), 48)
    torch.testing.assert_close(sample["image"], whole)
    assert torch.equal(sample["mask"], whole_mask)
    assert data.SegDataset(items, 48, **kw)[0]["image"].shape == (1, 48, 48)  # a crop of the 96-px image


def test_fov_evaluation_scores_at_the_original_size():
    # The network sees the image at the fov's size; the probabilities come back at H × W.
    seen = []

    class Net(torch.nn.Module):
        strides = [2]

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return {"pred": torch.cat([x - 0.5, 0.5 - x], 1) * 10}

    x = torch.rand(1, 1, 30, 50)
    res = evaluate.predict(Net(), x, fov=20)
    assert seen == [(12, 20)] and res["prob"].shape == (1, 2, 30, 50)
    small = F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False)
    expected = F.interpolate(
        torch.softmax(Net()(small)["pred"], 1), size=(30, 50), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(res["prob"], expected)
    items = data.synthetic_items(2, 0)
    out = evaluate.evaluate(Net(), items, fov=24, synthetic_size=40, overlays=0)
    assert all((r["height"], r["width"]) == (40, 40) for r in out["per_image"])
    assert np.isfinite(out["summary"]["dice"][0])


def test_fov_trains_and_is_kept_in_the_checkpoint(tmp_path):
    cfg = tiny(tmp_path, fov=48, epochs=1, max_steps=1)
    res = Trainer(cfg).fit()
    assert "dice" in res
    from busseg_ops.train.export import load_network

    _, back = load_network(str(tmp_path / "run" / "best.pt"))
    assert back.fov == 48
