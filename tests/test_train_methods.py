"""Each method's training step: finite loss, decreasing on a tiny fixed problem, and every switch
changes the computation."""

import copy

import pytest
import torch
from busseg_ops.train import data, engine, methods
from train_helpers import tiny


def _batch(n, seed, size=64, labeled=True):
    ds = data.SegDataset(data.synthetic_items(n, seed), size, train=False, labeled=labeled)
    s = [ds[i] for i in range(n)]
    return {
        "image": torch.stack([x["image"] for x in s]),
        "mask": torch.stack([x["mask"] for x in s]),
        "cls": torch.tensor([x["cls"] for x in s]),
    }


def oracle_teacher(x, **flags):
    """A teacher that already knows the lesions are dark: both classes occur in its pseudo-labels,
    so the contrastive term has anchors of both classes (an untrained teacher predicts one)."""
    return {"pred": torch.cat([x - 0.3, 0.3 - x], 1) * 20}


def _setup(cfg):
    torch.manual_seed(0)
    student = engine.build_model(cfg)
    teacher = oracle_teacher if cfg.method == "phnet" else copy.deepcopy(student).eval()
    return student, teacher, methods.build(cfg)


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
        ("phnet", {"gamma": 0.99}, {}),
        ("lanet", {"tau": 1.0}, {"tau": 0.0}),
        ("lanet", {"alpha": 0.5}, {"tau": 0.0}),
        ("semiseg_caw", {"stage1_epochs": 5}, {}),
    ],
)
def test_every_switch_changes_the_loss(tmp_path, name, switch, kw):
    base, _ = _loss(tiny(tmp_path, method=name, **kw))
    other, _ = _loss(tiny(tmp_path, method=name, **{**kw, **switch}))
    assert not torch.isclose(base, other, rtol=1e-6, atol=1e-8), (base, other)


def test_phnet_memory_bank_changes_contrastive_loss(tmp_path):
    # MB on: positives are the bank means of earlier batches; off: this batch's own means.
    def second_loss(mb):
        cfg = tiny(tmp_path, method="phnet", mb=mb, gamma=0.0)
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
    _, logs = _loss(tiny(tmp_path, method="rabusseg"), {"epoch": 0, "progress": 0, "warmup": True})
    assert "loss_u" not in logs and "loss_arp" in logs
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
