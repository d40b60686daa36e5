"""Each method's training step: finite loss, decreasing on a tiny fixed problem, and every switch
changes the computation."""

import copy
import math

import pytest
import torch
from train_helpers import tiny

import busseg_ops
from busseg_ops.train import data, engine, methods


def _batch(n, seed, size=64, labeled=True):
    ds = data.SegDataset(data.synthetic_items(n, seed), size, train=False, labeled=labeled)
    s = [ds[i] for i in range(n)]
    return {
        "image": torch.stack([x["image"] for x in s]),
        "mask": torch.stack([x["mask"] for x in s]),
        "cls": torch.tensor([x["cls"] for x in s]),
    }


class OracleTeacher(torch.nn.Module):
    """A teacher that already knows the lesions are dark: both classes occur in its pseudo-labels,
    so the contrastive term has anchors of both classes (an untrained teacher predicts one).
    Its `rep`: 16 unit features that depend on the intensity (tiny's rep_dim). A module without
    parameters, so that the methods can switch it to train mode and back (teacher_train_mode)."""

    def forward(self, x, need_rep=False, **flags):
        out = {"pred": torch.cat([x - 0.3, 0.3 - x], 1) * 20}
        if need_rep:
            out["rep"] = torch.nn.functional.normalize(torch.cat([torch.cos(k * x) for k in range(1, 17)], 1), dim=1)
        return out


oracle_teacher = OracleTeacher().eval()


def _setup(cfg):
    torch.manual_seed(0)
    student, method = engine.build_model(cfg), methods.build(cfg)
    teacher = oracle_teacher if isinstance(method, methods.PHNet) else copy.deepcopy(student).eval()
    return student, teacher, method


def _loss(cfg, ctx=None, seed=0):
    student, teacher, method = _setup(cfg)
    student.train()
    torch.manual_seed(seed)
    loss, logs = method(
        student,
        teacher,
        _batch(2, 1),
        _batch(2, 2, labeled=False),
        ctx or {"epoch": 1, "progress": 0.5, "warmup": False, "epochs": 2},
    )
    return loss, logs


CASES = [("suponly", {}), ("rabusseg", {}), ("phnet", {}), ("lanet", {"tau": 0.0}), ("semiseg_caw", {})]


@pytest.mark.parametrize("name,kw", CASES)
def test_step_finite_and_decreasing(tmp_path, name, kw):
    cfg = tiny(tmp_path, method=name, **kw)
    student, teacher, method = _setup(cfg)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    lab, unl = _batch(2, 1), _batch(2, 2, labeled=False)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same cutmix / proxies each step: a fixed problem
        student.train()
        loss, logs = method(student, teacher, lab, unl, {"epoch": 1, "progress": 0.5, "warmup": False, "epochs": 2})
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # From step 1: at step 0 PH-Net's memory bank is still empty (no positives, no L_c yet).
    assert losses[-1] < losses[1], losses


@pytest.mark.parametrize(
    "name,switch,kw",
    [
        ("rabusseg", {"arp": False}, {}),
        ("rabusseg", {"cra": False}, {}),
        ("rabusseg", {"cra_strategy": "random"}, {}),
        ("rabusseg", {"cra_scales": 2}, {}),
        ("rabusseg", {"drop_percent": 100.0}, {}),
        ("suponly", {"criterion": "ce+dice"}, {}),
        ("suponly", {"criterion": "ohem", "ohem_min_kept": 1000}, {"criterion": "ce"}),
        ("phnet", {"apa": False}, {}),
        ("phnet", {"hpc": False}, {"mb": False, "gamma": 0.0}),
        ("phnet", {"gamma": 0.99}, {"unsup_form": "paper"}),
        ("phnet", {"unsup_form": "paper"}, {}),
        ("phnet", {"contrast_negatives": "anchors"}, {"mb": False, "hpc_form": "paper"}),
        ("phnet", {"hpc_form": "paper"}, {}),
        ("phnet", {"apa_mix": "easy_rand"}, {}),
        ("phnet", {"apa_mix": "ramp"}, {"apa_mix": "easy_rand"}),
        ("rabusseg", {"teacher_train_mode": False}, {}),
        ("suponly", {"criterion": "ohem", "ohem_scale": False}, {"criterion": "ohem"}),
        ("lanet", {"tau": 1.0}, {"tau": 0.0}),
        ("lanet", {"alpha": 0.5}, {"tau": 0.0}),
        ("semiseg_caw", {"stage1_epochs": 5}, {}),
        ("semiseg_caw", {"class_elevate": False}, {}),
    ],
)
def test_every_switch_changes_the_loss(tmp_path, name, switch, kw):
    base, _ = _loss(tiny(tmp_path, method=name, **kw))
    other, _ = _loss(tiny(tmp_path, method=name, **{**kw, **switch}))
    assert not torch.isclose(base, other, rtol=1e-6, atol=1e-8), (base, other)


def test_phnet_memory_bank_changes_contrastive_loss(tmp_path):
    # MB on: positives are the bank means of earlier batches; off: this batch's own means.
    def second_loss(mb):
        cfg = tiny(tmp_path, method="phnet", mb=mb, gamma=0.0, hpc_form="paper")
        student, teacher, method = _setup(cfg)
        out = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            _, logs = method(
                student,
                teacher,
                _batch(2, 1),
                _batch(2, 2 + seed, labeled=False),
                {"epoch": 1, "progress": 1.0, "warmup": False, "epochs": 2},
            )
            out.append(logs["loss_c"])
        return out[1], method

    with_bank, m = second_loss(True)
    without, _ = second_loss(False)
    assert all(mean is not None for mean in m.bank.means())
    assert with_bank > 0 and without > 0 and not torch.isclose(with_bank, without)


def test_warmup_and_stage1_are_supervised_only(tmp_path):
    # U2PL's sup_only epochs train L_s alone: rabusseg's ARP and CRA wait too (they ran in the
    # warm-up once), so every method leaves the warm-up with the same network as suponly.
    warm = {"epoch": 0, "progress": 0, "warmup": True, "epochs": 2}
    for name in ("rabusseg", "phnet"):
        loss, logs = _loss(tiny(tmp_path, method=name), warm)
        sup, _ = _loss(tiny(tmp_path, method="suponly"), warm)
        assert set(logs) == {"loss_s"} and torch.equal(loss, sup), (name, logs)
    _, logs = _loss(
        tiny(tmp_path, method="lanet", stage1_epochs=1), {"epoch": 0, "progress": 0, "warmup": False, "epochs": 2}
    )
    assert set(logs) == {"loss_floc"}
    _, logs = _loss(
        tiny(tmp_path, method="semiseg_caw", stage1_epochs=1), {"epoch": 0, "progress": 0, "warmup": False, "epochs": 2}
    )
    assert set(logs) == {"loss_aux_seg", "loss_aux_cls"}


def test_semiseg_caw_wgm_learns_the_weights(tmp_path):
    # At initialisation the WGM weights are 1 (log-variances 0), so on/off differ only once trained.
    def after_steps(wgm):
        cfg = tiny(tmp_path, method="semiseg_caw", wgm=wgm)
        student, teacher, method = _setup(cfg)
        opt = torch.optim.SGD(list(student.parameters()) + method.parameters(), lr=0.5)
        for _ in range(3):
            torch.manual_seed(0)
            student.train()
            loss, logs = method(
                student,
                teacher,
                _batch(2, 1),
                _batch(2, 2, labeled=False),
                {"epoch": 1, "progress": 0.5, "warmup": False, "epochs": 2},
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.detach(), method

    on, m = after_steps(True)
    off, _ = after_steps(False)
    assert m.wgm.log_vars.abs().sum() > 0 and not torch.isclose(on, off)


@pytest.mark.parametrize("negatives", ["centres", "anchors"])
@pytest.mark.parametrize("shape", [(2, 16, 32, 32), (3, 8, 20, 28)])
def test_phnet_contrastive_matches_its_formula(tmp_path, negatives, shape):
    """L_c against a direct computation. centres (PH-Net's released patch_contrast): a 2-way
    softmax of cos(z, own centre) against cos(z, other centre); anchors (Eq. 15 as printed):
    against every other-class anchor. Mean over anchors per class, then over classes."""
    b, d, h, w = shape
    cfg = tiny(tmp_path, method="phnet", mb=False, rep_dim=d, num_patches=4, max_anchors=10**6)
    cfg.phnet.contrast_negatives = negatives
    method = methods.build(cfg)
    g = torch.Generator().manual_seed(sum(shape))
    rep = torch.nn.functional.normalize(torch.randn(b, d, h, w, generator=g, dtype=torch.float64), dim=1)
    rep.requires_grad_(True)  # unit features, as the projector gives
    tprob = torch.softmax(torch.randn(b, 2, 4 * h, 4 * w, generator=g, dtype=torch.float64), 1)
    plm = tprob.argmax(1)
    plm[:, ::5] = 1 - plm[:, ::5]  # some pixels where the mixed pseudo-label and the teacher disagree
    loss, stats = method.contrastive(rep, plm, tprob)

    hard = busseg_ops.patch_entropy_hardness(tprob, num_patches=4)
    k = max(1, busseg_ops.shield_count(cfg.phnet.beta, 1.0, 16))
    sel = busseg_ops.reliable_hard_pixels(plm, tprob.argmax(1), hard, k, (h, w))
    z = torch.nn.functional.normalize(rep.permute(0, 2, 3, 1)[sel.mask], dim=1)
    y = sel.labels[sel.mask]
    centres = [torch.nn.functional.normalize(z[y == c].detach().mean(0), dim=0) for c in range(2)]
    per_class = []
    for c in range(2):
        zc = z[y == c]
        pos = zc @ centres[c]
        neg = (zc @ centres[1 - c])[:, None] if negatives == "centres" else zc @ z[y != c].detach().T
        logits = torch.cat([pos[:, None], neg], 1) / cfg.phnet.temperature
        per_class.append((torch.logsumexp(logits, 1) - logits[:, 0]).mean())
    expected = torch.stack(per_class).mean()
    assert int(stats["c_anchors"]) == len(z) and stats["c_anchors0"] > 0 and stats["c_anchors1"] > 0
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-8)
    (g1,) = torch.autograd.grad(loss, rep)
    (g2,) = torch.autograd.grad(expected, rep)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)


def reference_patch_contrast(rep_u, label_u, prob_u, rep_l, label_l, prob_l, n, temp):
    """The released patch_contrast's steps, patch by patch (sides divisible by n)."""
    h, w = rep_u.shape[-2:]
    ph, pw = h // n, w // n

    def patch(x, b, i, j):
        return x[b, ..., i * ph : (i + 1) * ph, j * pw : (j + 1) * pw]

    def both(labels, b, i, j):
        p = patch(labels, b, i, j)
        return bool((p == 0).any() and (p == 1).any())

    def ratio(prob, b, i, j):
        p = patch(prob, b, i, j)
        return float((-(p * torch.log(p + 1e-10)).sum(0) / math.log(2)).mean())

    grid = [(i, j) for i in range(n) for j in range(n)]
    lab = [(b, i, j) for b in range(len(rep_l)) for i, j in grid if both(label_l, b, i, j)]
    unl = [(b, i, j) for b in range(len(rep_u)) for i, j in grid if both(label_u, b, i, j)]
    protos = [[patch(rep_l, *t)[:, patch(label_l, *t) == c].mean(1) for c in (0, 1)] for t in lab]
    r_l = torch.tensor([ratio(prob_l, *t) for t in lab])
    losses = []
    for t in unl:
        proto = protos[int((r_l - ratio(prob_u, *t)).abs().argmin())]
        feats = patch(rep_u, *t).reshape(rep_u.shape[1], -1).T
        labels = patch(label_u, *t).reshape(-1)
        sim = torch.nn.functional.normalize(torch.stack([feats @ proto[0], feats @ proto[1]], -1), dim=-1)
        closer = torch.softmax(sim, -1).argmax(-1)
        for c in (0, 1):
            a = feats[(closer == c) & (labels == c)]
            if len(a):
                cos = torch.stack([torch.cosine_similarity(a, proto[k][None], dim=1) for k in (c, 1 - c)], 1)
                losses.append(torch.nn.functional.cross_entropy(cos / temp, torch.zeros(len(a), dtype=torch.long)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shape", [(2, 6, 16, 12, 4), (3, 5, 13, 11, 3)])
def test_patch_prototype_contrast_matches_the_released_patch_contrast(shape):
    b, d, h, w, n = shape
    g = torch.Generator().manual_seed(h * w)

    def labels():
        y = (torch.rand(b, 1, h // 2, w // 2, generator=g) > 0.5).float()
        return torch.nn.functional.interpolate(y, size=(h, w), mode="nearest")[:, 0].long()  # blobs

    rep_u = torch.nn.functional.normalize(torch.randn(b, d, h, w, generator=g, dtype=torch.float64), dim=1)
    rep_u.requires_grad_(True)
    rep_l = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    label_u, label_l = labels(), labels()
    label_u[:, 0, :3] = methods.IGNORE  # padding: never an anchor
    prob_u, prob_l = (torch.softmax(torch.randn(b, 2, h, w, generator=g, dtype=torch.float64), 1) for _ in range(2))
    loss, stats = methods.patch_prototype_contrast(rep_u, label_u, prob_u, rep_l, label_l, prob_l, n, 0.5)
    if h % n or w % n:  # the contract: sides resized up to multiples of n first
        size = (n * -(-h // n), n * -(-w // n))

        def up(x):
            return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=True)

        def up_labels(y):
            return torch.nn.functional.interpolate(y[:, None].double(), size=size, mode="nearest")[:, 0].long()

        args = (up(rep_u), up_labels(label_u), up(prob_u), up(rep_l), up_labels(label_l), up(prob_l))
    else:
        args = (rep_u, label_u, prob_u, rep_l, label_l, prob_l)
    expected = reference_patch_contrast(*args, n, 0.5)
    assert stats["c_anchors"] > 0 and 0 < stats["c_agree"] < 1
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(loss, rep_u)
    (g2,) = torch.autograd.grad(expected, rep_u)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    # One class only in every unlabelled patch: nothing to contrast, a zero still on the graph.
    zero, _ = methods.patch_prototype_contrast(rep_u, torch.zeros_like(label_u), prob_u, rep_l, label_l, prob_l, n, 0.5)
    assert zero.item() == 0 and zero.requires_grad


def test_bank_centres_follow_the_anchors_device():
    # The bank lives on the CPU; under --device cuda its means met CUDA anchors. No GPU here: the
    # meta device stands in for "not the bank's device".
    bank = busseg_ops.ClassMemoryBank(2, 4, 8)
    bank.push(torch.nn.functional.normalize(torch.randn(3, 4), dim=1), torch.tensor([0, 0, 0]))
    centres = methods.bank_centres(bank, torch.device("meta"))
    assert centres[0].device.type == "meta" and centres[0].shape == (4,) and centres[1] is None


def test_class_loss_trains_the_class_head_on_known_classes_only():
    """lanet's and semiseg_caw's L_cls: cross-entropy over the images of known class (−1: unknown),
    with a gradient into the class head; a zero that still reaches the head when no class is known."""
    from busseg_ops.train.methods.base import class_loss

    logits = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    lab, unl = {"cls": torch.tensor([1, -1])}, {"cls": torch.tensor([0, -1, 1])}
    loss = class_loss(logits, lab, unl)
    known = torch.tensor([0, 2, 4])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[known], torch.tensor([1, 0, 1])))
    loss.backward()
    assert (logits.grad[known].abs().sum(1) > 0).all() and (logits.grad[[1, 3]] == 0).all()
    none_known = class_loss(logits, {"cls": torch.tensor([-1, -1])}, None)
    assert none_known.item() == 0 and none_known.grad_fn is not None


def test_teacher_train_forward_builds_no_graph():
    """U2PL's second teacher forward runs in train mode but without gradients, and leaves eval mode."""
    from busseg_ops.train.methods.base import teacher_train_forward

    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    out = teacher_train_forward(teacher, torch.randn(2, 1, 8, 8))
    assert out.grad_fn is None and not out.requires_grad and not teacher.training
    assert teacher[1].num_batches_tracked.item() == 1  # it ran in train mode: BN folded the batch in


@pytest.mark.parametrize("stride", [1, 4, 8])
@pytest.mark.parametrize("method, flags", [("suponly", {}), ("rabusseg", {}), ("phnet", {"hpc": False})])
def test_an_unused_projector_is_drawn_as_it_always_was(method, flags, stride):
    # Every U-Net draws PH-Net's projector (dropped unless its method uses it), so that a seed gives the
    # initial weights and the random stream it always gave. --unet-rep-stride once changed the drawn head's
    # shape for every method, and with it every later draw (make demo's Dice moved by 4-6 points).
    # The values: the stream after building the network, from d9f9ec1 (before the setting).
    torch.manual_seed(0)
    methods.get(method).build_model(engine.TrainConfig(method=method, unet_rep_stride=stride, **flags))
    assert torch.rand(3).tolist() == [0.12482190132141113, 0.9146623015403748, 0.5157020688056946]
