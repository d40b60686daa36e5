"""Training loop: bit-for-bit resume (float32, and bf16 autocast with channels-last), a bf16 step
against the float32 one, --compile, signal checkpoint, CLI round trip, 2-process gloo DDP, and the
BUSI integration run."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny

import busseg_ops
from busseg_ops.train import Trainer, checkpoint, cli, data, engine, metrics
from busseg_ops.train.errors import UserError
from busseg_ops.train.evaluate import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSI = os.path.join(REPO, "..", "shared", "data", "BUSI")


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _StopAfter:
    """A StopGuard stand-in that asks for a stop after n steps."""

    def __init__(self, n):
        self.n = n

    @property
    def requested(self):
        self.n -= 1
        return self.n < 0


@pytest.mark.parametrize("method,amp", [("rabusseg", "off"), ("phnet", "off"), ("rabusseg", "bf16")])
def test_resume_is_bit_for_bit(tmp_path, method, amp):
    kw = dict(method=method, warmup_epochs=1, amp=amp, channels_last=amp != "off")
    cfg = tiny(tmp_path / "a", **kw)
    straight = Trainer(cfg)
    straight.fit()
    # 1 epoch, then a signal-like stop in the middle of epoch 2, then resume twice.
    cfg_b = tiny(tmp_path / "b", **kw)
    tr = Trainer(cfg_b)
    tr._run_epoch(_StopAfter(99))
    assert tr._run_epoch(_StopAfter(0)) is True  # stopped after 1 of 2 steps, last.pt written
    resumed = Trainer(cfg_b)
    resumed.resume(os.path.join(cfg_b.out, "last.pt"))
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 1)
    resumed.fit()
    # The interrupted epoch's means count its steps before the stop too (they were the resumed steps' only).
    assert open(os.path.join(cfg_b.out, "metrics.csv")).read() == open(os.path.join(cfg.out, "metrics.csv")).read()
    _same(straight.state_dict()["student"], resumed.state_dict()["student"])
    _same(straight.state_dict()["teacher"], resumed.state_dict()["teacher"])
    if method == "phnet":
        _same(straight.method.bank.state_dict(), resumed.method.bank.state_dict())


# phnet's paper-form HPC: the busseg op on the bfloat16 features (the code form's untrained teacher here
# gives no patch holding both classes, so no contrastive term to compare)
@pytest.mark.parametrize("method,hpc_form", [("rabusseg", "code"), ("phnet", "paper")])
def test_bf16_autocast_step_follows_the_float32_step(tmp_path, monkeypatch, method, hpc_form):
    """One --amp bf16 step (channels-last) from the weights, batch and draws of a float32 step:
    the busseg ops get the networks' bfloat16 outputs, the weights stay float32, and every loss
    agrees with the float32 step's within bfloat16's precision."""
    seen = {}
    for name in ("adjacent_relation_propagation", "cross_layer_alignment_loss", "memory_contrastive_loss"):
        op = getattr(busseg_ops, name)

        def spy(first, *args, _op=op, _name=name, **kw):
            seen[_name] = (first[0] if isinstance(first, list) else first).dtype
            return _op(first, *args, **kw)

        monkeypatch.setattr(busseg_ops, name, spy)
    logs = {}
    for amp in ("off", "bf16"):
        tr = Trainer(tiny(tmp_path / amp, method=method, amp=amp, channels_last=amp == "bf16", hpc_form=hpc_form))
        if method == "phnet":  # both class centres exist (a first step has none and skips the op)
            g = torch.Generator().manual_seed(2)
            tr.method.bank.push(F.normalize(torch.randn(8, tr.cfg.rep_dim, generator=g), dim=1), torch.arange(8) % 2)
        lab, unl = next(iter(tr._batches(0)))
        torch.manual_seed(1)  # the same cutmix boxes and proxies
        logs[amp] = tr.train_step(lab, unl, {"epoch": 0, "progress": 0.5, "warmup": False, "epochs": 2})
    assert all(p.dtype == torch.float32 for p in tr.student.parameters())
    expected = {
        "rabusseg": {"adjacent_relation_propagation", "cross_layer_alignment_loss"},
        "phnet": {"memory_contrastive_loss"},
    }[method]
    assert set(seen) == expected and set(seen.values()) == {torch.bfloat16}, seen  # the last step's inputs
    if method == "phnet":  # the released negatives: the other class's centre, one per anchor
        assert logs["bf16"]["c_negatives"] == 1 and logs["bf16"]["loss_c"] > 0
    # the train-mode teacher's batch statistics (teacher_train_mode) add to bfloat16's rounding
    for k, v in logs["off"].items():
        assert logs["bf16"][k] == pytest.approx(v, rel=0.1, abs=0.03), k


def test_compile_compiles_both_forwards_in_place(tmp_path, monkeypatch):
    """--compile compiles the student's and the teacher's forward in place (the checkpoint keeps
    its keys) and trains. Inductor's code generation takes minutes on 2 cores: here the compiled
    graphs run on the aot_eager backend (traced, fake kernels and autograd, no code generated)."""
    compiled, compile_ = [], torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, **kw: compiled.append(self) or compile_(self, backend="aot_eager", **kw),
    )
    cfg = tiny(tmp_path, method="suponly", compile=True, epochs=1, max_steps=2, overlays=0)
    tr = Trainer(cfg)
    assert compiled == [tr.student, tr.teacher]
    torch._dynamo.reset()
    tr.fit()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the student's and the teacher's
    assert list(checkpoint.load(os.path.join(cfg.out, "last.pt"))["student"]) == list(
        engine.build_model(cfg).state_dict()
    )


def test_checkpoint_is_atomic_and_complete(tmp_path):
    cfg = tiny(tmp_path, method="phnet", epochs=1, max_steps=1)
    Trainer(cfg).fit()
    st = checkpoint.load(os.path.join(cfg.out, "last.pt"))
    assert {"student", "teacher", "optimizer", "scheduler", "method", "rng", "epoch"} <= set(st)
    assert "bank" in st["method"]
    assert not [f for f in os.listdir(cfg.out) if f.startswith(".tmp-")]
    for f in ("metrics.csv", "best.pt", "test_metrics.json", "test_per_image.csv", "curves.png"):
        assert os.path.isfile(os.path.join(cfg.out, f)), f
    assert os.listdir(os.path.join(cfg.out, "overlays"))


def test_dropout_setting_builds_the_network_and_older_checkpoints_read_as_without_it(tmp_path, monkeypatch):
    def dropouts(cfg):
        return sum(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in engine.build_model(cfg).modules())

    assert dropouts(tiny(tmp_path, method="rabusseg")) == 2  # classifier path + its relation head, as upstream
    assert dropouts(tiny(tmp_path, method="phnet")) == 2  # classifier path + its projector
    assert dropouts(tiny(tmp_path, method="rabusseg", encoder_dropout=True)) == 7  # + 5 SSL4MIS encoder blocks
    assert dropouts(tiny(tmp_path, method="phnet", dropout=False)) == 0
    assert dropouts(tiny(tmp_path, method="semiseg_caw")) == 0  # no public code: the paper's network
    # A checkpoint written before the setting existed (busseg-checkpoint/1) was trained without
    # dropout; resuming it must not switch dropout on.
    path = str(tmp_path / "old.pt")
    monkeypatch.setattr(checkpoint, "FORMAT", checkpoint.FORMAT_V1)
    checkpoint.save({"config": {"method": "rabusseg"}, "teacher": {}, "student": {}}, path)
    assert checkpoint.load(path)["config"]["dropout"] is False
    assert checkpoint.load(path)["config"]["encoder_dropout"] is False
    # before encoder_dropout existed, --dropout meant the SSL4MIS encoder dropout as well
    checkpoint.save({"config": {"method": "rabusseg", "dropout": True}, "teacher": {}, "student": {}}, path)
    assert checkpoint.load(path)["config"]["dropout"] is True
    assert checkpoint.load(path)["config"]["encoder_dropout"] is True
    # settings added by issue 30: an older run resumes with the step it trained with
    config = checkpoint.load(path)["config"]
    assert config["pseudo"]["teacher_train_mode"] is False and config["ohem_scale"] is False
    assert (config["phnet"]["unsup_form"], config["phnet"]["apa_mix"]) == ("paper", "ramp")
    monkeypatch.undo()
    cfg = tiny(tmp_path, method="phnet")
    checkpoint.save({"config": dataclasses.asdict(cfg), "teacher": {}, "student": {}}, path)
    assert checkpoint.load(path)["config"] == dataclasses.asdict(cfg)  # a new checkpoint: as written


def test_cli_train_eval_predict_compare(tmp_path, capsys):
    common = [
        "--synthetic-n",
        "24",
        "--synthetic-size",
        "64",
        "--crop",
        "64",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--unet-base",
        "4",
        "--batch-labeled",
        "2",
        "--batch-unlabeled",
        "2",
        "--proj-dim",
        "16",
        "--rep-dim",
        "16",
        "--num-proxies",
        "8",
        "--quiet",
    ]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["train", "--method", "suponly", "--amp", "bf16", "--channels-last", "--out", a, *common]) == 0
    assert checkpoint.load(os.path.join(a, "last.pt"))["config"]["amp"] == "bf16"
    assert cli.main(["train", "--method", "rabusseg", "--no-cra", "--out", b, *common]) == 0
    assert cli.main(["eval", "--checkpoint", os.path.join(b, "best.pt"), "--out", str(tmp_path / "ev")]) == 0
    assert os.path.isfile(tmp_path / "ev" / "test_per_image.csv")
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from busseg_ops.train import synthetic, visualize

    visualize.save_png(synthetic.make_image(1, 80)[0][:, :56], str(img_dir / "x.png"))  # 80 × 56
    assert (
        cli.main(["predict", str(img_dir), "--checkpoint", os.path.join(b, "best.pt"), "--out", str(tmp_path / "pred")])
        == 0
    )
    assert data.read_gray(str(tmp_path / "pred" / "x_pred.png")).shape == (80, 56)  # the image's own size
    assert cli.main(["compare", a, b]) == 0
    assert "Wilcoxon" in capsys.readouterr().out


def test_ddp_two_processes_gloo(tmp_path):
    """DDP syncs exactly what trains, without searching for unused parameters: phnet (its projector
    trains from the first step), rabusseg through its supervised-only epoch (the relation head
    frozen, then training) and semiseg_caw through its two stages (the auxiliary network, then the
    main one; also with IMTL and the LayerCAM guide); the replicas stay equal."""
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import gc, torch, torch.distributed as dist
        from busseg_ops.train import Trainer, TrainConfig
        common = dict(synthetic_n=24, synthetic_size=64, crop=64, max_steps=2, batch_labeled=2, batch_unlabeled=2,
                      unet_base=4, proj_dim=16, rep_dim=16, num_proxies=8, quiet=True, overlays=0)
        runs = {{
            "phnet": dict(epochs=1, warmup_epochs=0, gamma=0.0, hpc_form="paper"),
            "rabusseg": dict(epochs=2, warmup_epochs=1),
            "semiseg_caw": dict(epochs=2, warmup_epochs=0, stage1_epochs=1),
            # IMTL takes per-task gradients of the parameters, LayerCAM one inside the frozen network's forward
            "semiseg_caw_ablations": dict(
                method="semiseg_caw", epochs=2, warmup_epochs=0, stage1_epochs=1, weighting="imtl", guide_map="layercam"
            ),
        }}
        for method, kw in runs.items():
            cfg = TrainConfig(**{{"method": method, **kw}}, out={str(tmp_path)!r} + "/" + method, **common)
            tr = Trainer(cfg)
            assert tr.world == 2
            # SyncBatchNorm on CUDA (torch has no CPU kernel for it); plain BN + buffer broadcast on CPU
            sync = any(isinstance(m, torch.nn.SyncBatchNorm) for m in tr.student.modules())
            assert sync == (tr.device.type == "cuda")
            tr.fit()
            assert isinstance(tr.student, torch.nn.parallel.DistributedDataParallel)
            assert not tr.student.find_unused_parameters
            # the method's own parameters too (SemiSeg-CAW's learned loss weights, outside DDP's module)
            params = list(tr.student.parameters()) + tr.method.parameters()
            flat = torch.cat([p.detach().flatten() for p in params])
            got = [torch.zeros_like(flat) for _ in range(2)]
            dist.all_gather(got, flat)
            assert torch.equal(got[0], got[1]), method + ": replicas diverged"
            assert len(getattr(tr.method, "bank", [None])) > 0  # phnet's bank filled
            print("rank", dist.get_rank(), method, "ok")
            del tr  # DDP's reducer holds the process group: free it first, or gloo's threads may abort the exit
            gc.collect()
        dist.destroy_process_group()
    """)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok") == 8
    runs = ("phnet", "rabusseg", "semiseg_caw", "semiseg_caw_ablations")
    assert all(os.path.isfile(tmp_path / m / "last.pt") for m in runs)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(BUSI), reason=f"BUSI data not found at {BUSI}")
def test_busi_integration_rabusseg_beats_chance(tmp_path):
    cfg = engine.TrainConfig(
        method="rabusseg",
        data="busi",
        root=BUSI,
        limit=48,
        crop=128,
        partition="1/2",
        epochs=30,
        warmup_epochs=2,
        lr=0.01,
        weight_decay=1e-4,
        batch_labeled=4,
        batch_unlabeled=4,
        ema=0.9,
        criterion="ce+dice",
        unet_base=16,
        proj_dim=32,
        rep_dim=16,
        num_proxies=32,
        out=str(tmp_path / "busi"),
        quiet=True,
        overlays=2,
    )
    res = engine.run(cfg)
    # Chance: the all-lesion prediction on a fixed set of 32 test-list images not in the subset.
    sp = data.make_splits("busi", BUSI, "1/2", 0, limit=48)
    subset = {it.name for part in (sp.labeled, sp.unlabeled, sp.val, sp.test) for it in part}
    test = [it for it in data.busi_items(BUSI) if it.name in data.read_list(os.path.join(BUSI, "splits", "test.txt"))]
    test = [it for it in test if it.name not in subset][:32]
    model = engine.build_model(cfg)
    model.load_state_dict(checkpoint.load(os.path.join(cfg.out, "best.pt"))["teacher"])
    ours = evaluate(model, test)["summary"]["dice"][0]  # each image at its original size
    masks = [torch.from_numpy(data.load_item(it)[1]).long() for it in test]
    chance = sum(metrics.seg_metrics(torch.ones_like(m), m)["dice"] for m in masks) / len(masks)
    print(f"BUSI 48-image subset: held-out Dice {ours:.3f} (subset test {res['dice'][0]:.3f}), chance {chance:.3f}")
    # Measured at original size: 0.319 against 0.087 with 30 epochs under the upstream defaults of
    # issue 30 in two threads, 0.253 in the one thread of a make-test worker (60 epochs of the
    # earlier step gave 0.380, but the train-mode teacher pass made them cost 5 min); --limit takes
    # a share of each of the authors' lists: 19 + 19 training images, 10 test (it drew 48 images at
    # random before, which gave 0.197 against 0.098).
    assert ours > chance + 0.05


def test_an_empty_stream_is_an_error_not_a_hang(tmp_path):
    tr = Trainer(tiny(tmp_path, method="rabusseg"))
    tr.lab_ds.items = []  # an empty labelled list once hung Trainer._batches (lists are checked now)
    with pytest.raises(UserError, match=r"the labelled stream of rank 0 has no batch \(0 images\)"):
        next(tr._batches(0))


def test_divergence_is_one_line_naming_the_loss_and_lr(tmp_path, monkeypatch):
    tr = Trainer(tiny(tmp_path, lr=0.5))

    def nan_step(student, teacher, lab, unl, ctx):
        loss = student(lab["image"])["pred"].sum() * float("nan")
        return loss, {"loss_s": loss.detach()}

    monkeypatch.setattr(tr, "method", type(tr.method)(tr.cfg))
    monkeypatch.setattr(type(tr.method), "__call__", lambda self, *a: nan_step(*a))
    lab, unl = next(tr._batches(0))
    with pytest.raises(engine.TrainingDiverged) as err:
        tr.train_step(lab, unl, {"epoch": 0, "warmup": True, "progress": 0.0, "epochs": 2})
    text = str(err.value)
    assert len(text.splitlines()) == 1 and "the loss is nan at epoch 1 step 1 (loss_s nan)" in text and "--lr" in text


def test_per_epoch_lines_stay_under_quiet_and_bars_only_on_a_terminal(tmp_path, capsys):
    tr = Trainer(tiny(tmp_path, quiet=False, epochs=1, max_steps=1, overlays=0))
    bar = tr._bar(3)
    assert bar is None or bar.disable  # pytest's captured stderr is not a terminal
    tr.cfg.quiet = True
    tr.fit()
    out = capsys.readouterr().out
    assert out.count("epoch=1 step=1") == 1 and out.startswith("data: synthetic")
    log = open(os.path.join(tr.cfg.out, "log.txt")).read()
    assert log.startswith("data: synthetic") and "epoch=1 step=1" in log
    with open(os.path.join(tr.cfg.out, "data.json")) as f:
        assert json.load(f)["sizes"] == {k: len(getattr(tr.splits, k)) for k in ("labeled", "unlabeled", "val", "test")}


def test_a_stop_after_an_epochs_last_step_resumes_and_one_beyond_this_configs_epoch_is_refused(tmp_path):
    straight = Trainer(tiny(tmp_path / "a", epochs=2, max_steps=2, overlays=0))
    straight.fit()
    cfg = tiny(tmp_path / "b", epochs=2, max_steps=2, overlays=0)
    tr = Trainer(cfg)
    assert tr._run_epoch(_StopAfter(1)) is True  # stopped after step 2 of 2, before the epoch's end
    assert (tr.epoch, tr.step_in_epoch) == (0, 2)
    resumed = Trainer(cfg)
    resumed.resume(os.path.join(cfg.out, "last.pt"))
    resumed.fit()  # the epoch ends with the sums of its two steps (the log row had no losses)
    assert (
        open(os.path.join(cfg.out, "metrics.csv")).read() == open(os.path.join(straight.cfg.out, "metrics.csv")).read()
    )
    cfg = tiny(tmp_path / "c", epochs=2, max_steps=3)
    tr = Trainer(cfg)
    assert tr._run_epoch(_StopAfter(1)) is True  # stopped after step 2 of 3
    fewer = Trainer(tiny(tmp_path / "c", epochs=2, max_steps=1))
    fewer.resume(os.path.join(cfg.out, "last.pt"))
    with pytest.raises(UserError, match="stopped after step 2 of epoch 1, but this config has 1 steps per epoch"):
        fewer.fit()
