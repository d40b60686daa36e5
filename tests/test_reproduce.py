"""`make reproduce`'s machinery on tiny synthetic runs: a finished run is skipped, an unfinished one
continues from last.pt, a changed setting is refused, and the report holds the table."""

import csv
import json
import os
import signal
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import reproduce  # noqa: E402

TINY = dict(data="synthetic", synthetic_n=40, synthetic_size=32, crop=32, max_steps=1, pseudo_label_check=3, quiet=True)
ROWS = [("suponly", {"method": "suponly"}, (0, 1)), ("rabusseg_no_cra", {"method": "rabusseg", "cra": False}, (0, 1))]


def test_reproduce_skips_resumes_and_reports(tmp_path, capsys):
    runs = reproduce.plan("smoke", None, str(tmp_path), runs=ROWS, common=TINY)
    assert [(r.name, r.seed) for r in runs] == [
        ("suponly", 0),
        ("suponly", 1),
        ("rabusseg_no_cra", 0),
        ("rabusseg_no_cra", 1),
    ]
    assert reproduce.train_all(runs, quiet=True)
    assert all(r.finished() for r in runs)
    first = os.path.getmtime(os.path.join(runs[0].out, "last.pt"))
    os.unlink(os.path.join(runs[3].out, "test_metrics.json"))  # as if stopped before its test
    assert reproduce.train_all(runs, quiet=True)
    assert "3 of 4 runs already finished; 1 to train" in capsys.readouterr().out
    assert runs[3].finished() and os.path.getmtime(os.path.join(runs[0].out, "last.pt")) == first
    changed = reproduce.plan("smoke", None, str(tmp_path), runs=ROWS, common={**TINY, "lr": 0.5})
    os.unlink(os.path.join(changed[0].out, "test_metrics.json"))
    with pytest.raises(SystemExit, match="other settings"):
        reproduce.train_all(changed, quiet=True)
    os.unlink(os.path.join(runs[0].out, "last.pt"))  # a fresh start instead
    assert reproduce.train_all(runs, quiet=True)

    path = reproduce.write_report(runs, "smoke", str(tmp_path / "REPRODUCTION.md"), "test")
    text = open(path).read()
    assert os.path.isfile(tmp_path / "reproduction_curves.png")
    assert reproduce.NOTES["smoke"] in text and "## History: defects found at the full scale" in text
    generated = text.split("## History")[0]  # the history after it has tables of its own
    table = [ln for ln in generated.splitlines() if ln.startswith("| suponly") or ln.startswith("| rabusseg_no_cra")]
    assert len(table) == 4  # results and pseudo-label rows
    assert "Wilcoxon p" in text and "beat suponly at this scale" in text and "`cra=False`" in text
    assert "run-level p" in text and "t-test p = " in text and "last quarter of the epochs" in text
    assert "wall time" in text and "UTC" in text


def _train_or_stop(run, quiet, threads):
    """A stand-in run for train_all's pool: the run named "stop" stops at once (as one signalled)."""
    open(os.path.join(run.out, "started"), "w").close()
    if run.name == "stop":
        return {"stopped": True}
    time.sleep(1.0)
    return {"dice": [0.5]}


def _train_until_signalled(run, quiet, threads):
    """A stand-in run that trains until its StopGuard sees a signal (at most 30 s)."""
    from busseg_ops.train import checkpoint

    with checkpoint.StopGuard() as guard:
        open(os.path.join(run.out, "started"), "w").close()
        for _ in range(600):
            if guard.requested:
                return {"stopped": True}
            time.sleep(0.05)
    return {"dice": [0.5]}


def _train_after_a_slow_start(run, quiet, threads):
    """A stand-in run whose StopGuard begins a second after it starts, as a Trainer's does after it
    is built and has loaded its checkpoint."""
    open(os.path.join(run.out, "started"), "w").close()
    time.sleep(1.0)
    return _train_until_signalled(run, quiet, threads)


def _fake_runs(tmp_path, names):
    runs = [reproduce.Run(n, 0, reproduce.TrainConfig(out=str(tmp_path / n))) for n in names]
    for r in runs:
        os.makedirs(r.out)
    return runs


def test_parallel_runs_start_nothing_after_a_stop(tmp_path):
    # The pool once queued every run at once: a Ctrl-C stopped the runs in flight, and the queued ones
    # started in their place (the converged reproduction went on that way).
    runs = _fake_runs(tmp_path, ["stop", "a", "b", "c"])
    order = {r.name: -i for i, r in enumerate(runs)}
    assert not reproduce.train_all(runs, jobs=2, train=_train_or_stop, cost=lambda r: order[r.name])
    started = {r.name for r in runs if os.path.isfile(os.path.join(r.out, "started"))}
    assert started == {"stop", "a"}  # "a" was in flight and ran to its end; "b" and "c" never started


@pytest.mark.parametrize("train", [_train_until_signalled, _train_after_a_slow_start])
def test_a_signal_to_the_parallel_driver_stops_its_runs(tmp_path, train):
    # `kill -INT` of the driver alone (not its process group): the runs in flight get it too, save and
    # stop, also those signalled before their own StopGuard began (they once trained on); the queued
    # ones never start, and the driver returns instead of dying.
    runs = _fake_runs(tmp_path, ["a", "b", "c"])
    markers = [os.path.join(r.out, "started") for r in runs[:2]]

    def interrupt_when_both_started():
        for _ in range(600):
            if all(os.path.isfile(m) for m in markers):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGINT)  # (an xdist worker ignores SIGINT)
    threading.Thread(target=interrupt_when_both_started, daemon=True).start()
    t0 = time.time()
    assert not reproduce.train_all(runs, jobs=2, train=train, cost=lambda r: -"abc".index(r.name))
    assert time.time() - t0 < 25  # the runs stopped on the signal, not after their 30 s
    assert not os.path.isfile(os.path.join(runs[2].out, "started"))
    assert signal.getsignal(signal.SIGINT) == before  # the driver's handler is gone again


def test_converged_scale_has_three_seeds_the_field_of_view_and_writes_the_main_report():
    runs = reproduce.plan("converged", "/data/BUSI", "/out")
    for name, _, _ in reproduce.RUNS:
        assert sorted(r.seed for r in runs if r.name == name) == [0, 1, 2]  # a run-level test needs three
    cfg = runs[0].cfg
    assert (cfg.fov, cfg.crop, cfg.dropout, cfg.data, cfg.partition) == (144, 128, True, "busi", "1/4")
    assert cfg.warmup_epochs * 20 == cfg.epochs  # upstream's share: 10 of 200
    assert reproduce.REPORT_SCALE == "converged"
    assert [r.seed for r in reproduce.plan("full", "/data/BUSI", "/out") if r.name == "suponly"] == [0, 1]


def _fake_run(tmp_path, name, seed, dice, val):
    run = reproduce.Run(name, seed, reproduce.TrainConfig(out=str(tmp_path / name / f"seed{seed}")))
    os.makedirs(run.out)
    with open(os.path.join(run.out, "test_metrics.json"), "w") as f:
        json.dump({"dice": {"mean": dice}}, f)
    with open(os.path.join(run.out, "metrics.csv"), "w") as f:
        f.write("epoch,val_dice\n" + "".join(f"{e + 1},{v}\n" for e, v in enumerate(val)))
    return run


def test_run_level_paired_test_and_the_convergence_criterion(tmp_path):
    from scipy import stats

    flat = [0.2, 0.4, 0.5, 0.55, 0.56, 0.562, 0.565, 0.566]
    base = [_fake_run(tmp_path, "suponly", s, d, flat) for s, d in enumerate([0.50, 0.55, 0.60])]
    other = [_fake_run(tmp_path, "rabusseg", s, d, flat) for s, d in enumerate([0.53, 0.56, 0.64])]
    p = reproduce.run_level_p(base, other)
    assert p == pytest.approx(stats.ttest_rel([0.53, 0.56, 0.64], [0.50, 0.55, 0.60]).pvalue)
    assert reproduce.run_level_p(base[:1], other[:1]) != reproduce.run_level_p(base[:1], other[:1])  # nan
    ok, spread = reproduce.converged(base)  # the last quarter: epochs 7-8
    assert ok and spread == pytest.approx(0.001)
    rising = [_fake_run(tmp_path, "rising", 0, 0.5, [0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.52, 0.56])]
    assert reproduce.converged(rising) == (False, pytest.approx(0.04))


def test_reproduce_rows_follow_the_upstream_configs():
    # RA-BUSSeg's released config trains without cutmix (apply_aug: False); the reproduction's
    # rabusseg row once kept our default of a box on every unlabelled image.
    import yaml

    from busseg_ops.train import config

    flags = {name: f for name, f, _ in reproduce.RUNS}
    preset = yaml.safe_load(open(config.preset_path("rabusseg_busi_1_4")))
    assert flags["rabusseg"]["cutmix_p"] == preset["cutmix_p"] == 0.0


def test_reproduce_keeps_the_projector_stride_each_scale_ran_with(tmp_path):
    # The full scale's runs (a finished report) had PH-Net's projector on the full-resolution map; the
    # converged scale restarted at upstream's stride 4, the default; a planned run must equal its last.pt.
    from busseg_ops.train import config

    assert config.TrainConfig().unet_rep_stride == 4
    want = {"full": 1, "converged": 4, "smoke": 4}
    assert set(want) == set(reproduce.SCALES)
    for scale, stride in want.items():
        for run in reproduce.plan(scale, str(tmp_path), str(tmp_path / "out")):
            assert run.cfg.unet_rep_stride == stride, (scale, run.name)


def test_diagnose_variants_continue_from_the_shared_warm_up_and_never_test(tmp_path, monkeypatch):
    import diagnose

    monkeypatch.setattr(reproduce, "COMMON", {**TINY, "val_from_train": 0, "batch_labeled": 2, "batch_unlabeled": 2})
    monkeypatch.setattr(reproduce, "SCALES", {"full": {**reproduce.SCALES["smoke"], "epochs": 3, "warmup_epochs": 1}})
    variants = dict((n, f) for n, f, _ in diagnose.VARIANTS)
    a = diagnose.train_variant("rabusseg no L_u", variants["rabusseg no L_u"], 0, None, str(tmp_path))
    b = diagnose.train_variant("phnet", variants["phnet"], 0, None, str(tmp_path))
    warm = os.path.join(tmp_path, "warm-up", "seed0")
    assert sorted(os.listdir(tmp_path)) == ["phnet", "rabusseg_no_L_u", "warm-up"]
    for res, slug in ((a, "rabusseg_no_L_u"), (b, "phnet")):
        run = os.path.join(tmp_path, slug, "seed0")
        rows = open(os.path.join(run, "metrics.csv")).read().splitlines()
        warm_row = open(os.path.join(warm, "metrics.csv")).read().splitlines()[1]
        assert rows[1].rstrip(",") == warm_row  # the same warm-up epoch (later columns blank)
        assert len(rows) == 1 + 3 and not os.path.exists(os.path.join(run, "test_metrics.json"))
        assert 0 <= res["best_val"] <= 1
    again = diagnose.train_variant("phnet", variants["phnet"], 0, None, str(tmp_path))
    assert again == b  # finished: skipped
    assert diagnose.finished(str(tmp_path), None) == [a, b]  # VARIANTS order
    path = diagnose.report([a, b], str(tmp_path), None, str(tmp_path / "diagnosis.md"))
    text = open(path).read()
    assert "| phnet |" in text and "| rabusseg no L_u |" in text and os.path.isfile(tmp_path / "diagnosis_curves.png")
    # A variant that changes the scale trains from scratch, without the warm-up, and is compared
    # with suponly at its own scale.
    assert diagnose.baseline_of("rabusseg 24 epochs") == "suponly 24 epochs"
    assert diagnose.baseline_of("rabusseg no ARP") == "suponly"
    c = diagnose.train_variant("suponly 192 px", {**variants["suponly"], "epochs": 2}, 0, None, str(tmp_path))
    rows = list(csv.DictReader(open(os.path.join(tmp_path, "suponly_192_px", "seed0", "metrics.csv"))))
    assert len(rows) == 2 and rows[0]["epoch"] == "1" and 0 <= c["best_val"] <= 1


def test_semiseg_caw_reproduction_trains_its_presets_resumes_and_reports(tmp_path, capsys):
    import json

    import reproduce_semiseg_caw as caw

    rows = [r for r in caw.ROWS if r[0] in ("MALUNet reduced", "SemiSeg-CAW (MALUNet)")]
    tiny = dict(data="synthetic", synthetic_n=24, synthetic_size=32, crop=32, epochs=2, stage1_epochs=1, max_steps=1)
    tiny.update(batch_labeled=2, batch_unlabeled=1, val_from_train=0, pseudo_label_check=2, overlays=0)
    runs = caw.plan("smoke", None, str(tmp_path), seeds=(0,), rows=rows, overrides=tiny)
    assert [(r.name, r.cfg.model, r.cfg.method, r.cfg.labeled_share) for r in runs] == [
        ("MALUNet reduced", "malunet", "suponly", 0.824),
        ("SemiSeg-CAW (MALUNet)", "malunet", "semiseg_caw", 0.824),
    ]
    assert runs[1].cfg.lr_schedule == "cosine" and runs[1].cfg.optimizer == "adamw"  # from the preset
    assert caw.train_all(runs)
    for r in runs:
        times = json.load(open(os.path.join(r.out, "epoch_times.json")))
        assert sorted(times) == ["1", "2"] and all(t > 0 for t in times.values())
    os.unlink(os.path.join(runs[1].out, "test_metrics.json"))  # as if stopped before its test
    assert caw.train_all(runs)
    assert "1 of 2 runs already finished; 1 to train" in capsys.readouterr().out
    path = caw.write_report(runs, "smoke", str(tmp_path / "SEMISEG_CAW.md"), "test", rows)
    text = open(path).read()
    assert os.path.isfile(tmp_path / "semiseg_caw_curves.png")
    row = next(ln for ln in text.splitlines() if ln.startswith("| SemiSeg-CAW (MALUNet)"))
    assert "`semiseg_caw_busi`" in row and "0.684 / 0.520" in row and "| MALUNet reduced |" in row
    assert "Wilcoxon" in text and "paired t-test" in text and "(14.5)" in row


def test_semiseg_caw_plan_builds_the_imtl_and_layercam_ablation_rows(tmp_path):
    import reproduce_semiseg_caw as caw

    names = ("IMTL instead of WGM", "LayerCAM instead of ClassElevateSeg")
    rows = [r for r in caw.ROWS if r[0] in names]
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        (names[0], "semiseg_caw_busi", "MALUNet reduced", (0.537, 0.367, None)),  # the paper's ablation table
        (names[1], "semiseg_caw_busi", "MALUNet reduced", (0.583, 0.411, None)),
    ]
    runs = caw.plan("smoke", None, str(tmp_path), rows=rows, overrides=dict(data="synthetic"))
    assert [(r.name, r.seed) for r in runs] == [(n, s) for n in names for s in caw.SEEDS]
    want = {names[0]: ("imtl", "segmentation"), names[1]: ("wgm", "layercam")}
    for r in runs:
        c = r.cfg.semiseg_caw
        assert (c.weighting, c.guide_map) == want[r.name] and c.wgm and c.class_elevate
        assert (r.cfg.method, r.cfg.model, r.cfg.labeled_share) == ("semiseg_caw", "malunet", 0.824)
        r.cfg.validate()
    assert len({r.out for r in runs}) == len(runs)  # each run its own folder
