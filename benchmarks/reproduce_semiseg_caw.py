"""`make reproduce-semiseg-caw`: SemiSeg-CAW's BUSI table (seed 004) at the paper's own scale, and its report.

    .venv/bin/python benchmarks/reproduce_semiseg_caw.py [--scale full|smoke] [--epochs N] [--limit N]
        [--seeds 0 1 2] [--only ROW ...] [--jobs N] [--root DIR] [--out DIR]

Every row of ROWS is a shipped preset (busseg_ops/train/configs/NAME.yaml: the paper's settings where its text
gives them, the public MALUNet/UNeXt configs where it is silent, each value's source in the preset's
comment) with the row's own flags, trained with every seed of SEEDS on BUSI with the authors' lists:
per seed, 52 training images drawn for validation (each run's best.pt is its best validation Dice),
the paper's labelled share 468/568 of the other 466 keeps its mask, the rest only its class label;
the test images (test.txt, 129) are used once, at the end, each at its original size. Seeds pair the
runs: the same seed gives every row the same validation images and the same labelled subset.

Each run lives in OUT/<scale>/<row>/seed<k>: a finished run is skipped, an interrupted one continues
from its last.pt (Ctrl-C saves one), so the target can be spread over sessions. The report
(benchmarks/SEMISEG_CAW.md and benchmarks/semiseg_caw_curves.png at the full scale; OUT/smoke/ for
the smoke scale, a pipeline check of a few minutes, never results) has the table beside the paper's,
the per-image Wilcoxon test and a run-level paired t-test of every SemiSeg-CAW row against its
supervised row, the training wall time per epoch beside the paper's, and the curves. --epochs and
--limit shorten a run (a smaller scale, reported as such).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from busseg_ops.train import TrainConfig, Trainer, config, methods
from busseg_ops.train.evaluate import compare_groups

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (its run bookkeeping: resume, skip, wall time, curves)

REPO = reproduce.REPO
SEEDS = (0, 1, 2)
SMOKE_SEEDS = (0,)  # --limit draws each seed's own test subset: the seeds of a smoke run share no test image

# (row, preset, flags, the supervised row it is tested against, the paper's Dice / IoU / s per epoch).
ROWS = [
    ("MALUNet full", "suponly_busi_malunet_full", {}, None, (0.672, 0.506, 2.96)),
    ("MALUNet reduced", "suponly_busi_malunet_reduced", {}, None, (0.662, 0.494, 2.96)),
    ("SemiSeg-CAW (MALUNet)", "semiseg_caw_busi", {}, "MALUNet reduced", (0.684, 0.520, 14.50)),
    # The ablation (the paper's table gives it on another setting: its full model scores 0.610 there).
    ("no ClassElevateSeg", "semiseg_caw_busi", {"class_elevate": False}, "MALUNet reduced", (0.571, 0.400, None)),
    ("static weights, no WGM", "semiseg_caw_busi", {"wgm": False}, "MALUNet reduced", (0.572, 0.401, None)),
    # "Strategy of [21] instead of WGM": [21] is IMTL (Liu et al., ICLR 2021), its hybrid here
    ("IMTL instead of WGM", "semiseg_caw_busi", {"weighting": "imtl"}, "MALUNet reduced", (0.537, 0.367, None)),
    (
        "no ClassElevateSeg, no WGM",
        "semiseg_caw_busi",
        {"class_elevate": False, "wgm": False},
        "MALUNet reduced",
        (0.601, 0.429, None),
    ),
    # "LayerCAM [27] instead of ClassElevateSeg": the same pre-trained network, its guide map by LayerCAM
    (
        "LayerCAM instead of ClassElevateSeg",
        "semiseg_caw_busi",
        {"guide_map": "layercam"},
        "MALUNet reduced",
        (0.583, 0.411, None),
    ),
    ("UNeXt", "suponly_busi_unext", {}, None, (0.710, 0.595, 1.57)),
    ("SemiSeg-CAW (UNeXt)", "semiseg_caw_busi_unext", {}, "UNeXt", (0.813, 0.704, 15.85)),
]
# The paper's ablation rows come from a table whose full model scores 0.610 / 0.439, not Table 1's.
ABLATION_FULL = (0.610, 0.439)

# What every run at a scale adds to its preset (the presets are the paper's scale).
SCALES = {
    "full": dict(pseudo_label_check=24, overlays=4),
    "smoke": dict(
        limit=40,  # a share of each BUSI list: 8 test, 32 training (4 for validation); one seed
        val_from_train=4,
        epochs=2,
        stage1_epochs=1,
        max_steps=2,
        crop=64,
        batch_labeled=2,
        batch_unlabeled=1,
        pseudo_label_check=2,
        overlays=0,
    ),
}


def row_config(preset: str, flags: dict, scale: str, seed: int, root: str, out: str, overrides: dict) -> TrainConfig:
    fields = {**config.load_file(config.preset_path(preset), "--preset"), **SCALES[scale], **flags, **overrides}
    return TrainConfig.from_dict({**fields, "root": root, "seed": seed, "out": out, "quiet": True})


def slug(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row).strip("_")


def plan(scale: str, root: str, out: str, seeds=SEEDS, rows=ROWS, overrides=None) -> list[reproduce.Run]:
    """Every (row, seed) as a reproduce.Run with its TrainConfig."""
    tag = scale + "".join(f"-{k}{v}" for k, v in sorted((overrides or {}).items()))
    return [
        reproduce.Run(
            name,
            seed,
            row_config(
                preset, flags, scale, seed, root, os.path.join(out, tag, slug(name), f"seed{seed}"), overrides or {}
            ),
            {"preset": preset, **flags},
        )
        for name, preset, flags, _, _ in rows
        for seed in seeds
    ]


def train_one(run: reproduce.Run, quiet: bool = True, threads: int | None = None) -> dict:
    """reproduce.train_one, with each epoch's training-step wall time kept in epoch_times.json
    (validation and the pseudo-label check excluded: the paper's "training time per epoch")."""
    path = os.path.join(run.out, "epoch_times.json")
    times = json.load(open(path)) if os.path.isfile(path) else {}
    original = Trainer.train_step

    def timed(self, lab, unl, ctx):
        t = time.perf_counter()
        logs = original(self, lab, unl, ctx)
        key = str(self.epoch + 1)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t
        return logs

    Trainer.train_step = timed
    try:
        return reproduce.train_one(run, quiet, threads)
    finally:
        Trainer.train_step = original
        os.makedirs(run.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(times, f)


def train_all(runs: list[reproduce.Run], jobs: int = 1) -> bool:
    """reproduce.train_all with this table's runs (timed per epoch), the longest rows first."""
    return reproduce.train_all(
        runs, True, jobs, train=train_one, cost=lambda r: r.cfg.epochs, target="make reproduce-semiseg-caw"
    )


def seconds_per_epoch(run: reproduce.Run) -> float:
    path = os.path.join(run.out, "epoch_times.json")
    times = json.load(open(path)) if os.path.isfile(path) else {}
    return float(np.median(list(times.values()))) if times else float("nan")


def counts(run: reproduce.Run) -> tuple[int, int]:
    sizes = json.load(open(os.path.join(run.out, "data.json")))["sizes"]
    return sizes["labeled"], sizes["unlabeled"] if methods.get(run.cfg.method).uses_unlabeled else 0


def run_dice(run: reproduce.Run) -> float:
    return json.load(open(os.path.join(run.out, "test_metrics.json")))["dice"]["mean"]


def write_report(runs: list[reproduce.Run], scale: str, path: str, command: str, rows=ROWS) -> str:
    groups = reproduce._groups(runs)
    curves = os.path.join(os.path.dirname(os.path.abspath(path)), "semiseg_caw_curves.png")
    reproduce.plot_curves(groups, curves)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cfg = runs[0].cfg
    lines = [
        "# SemiSeg-CAW on BUSI with MALUNet and UNeXt",
        "",
        f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}` (commit "
        f"{reproduce._git_commit()}, {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average at writing {load[0]:.1f}). Scale: {scale}"
        + (f" (`limit={cfg.limit}`, `epochs={cfg.epochs}`: a pipeline check, not results)" if scale != "full" else "")
        + ".",
        "",
        "Protocol: each row is its preset (busseg_ops/train/configs/, each value's source in a comment). The paper's "
        "572 training images of BUSI's 780 and its test set are not published; here the RA-BUSSeg authors' BUSI "
        "lists (647 benign + malignant images: 518 training, 129 test). Per seed: "
        f"{cfg.val_from_train} training images drawn for validation (model selection: best validation Dice); of "
        "the others, the paper's labelled share 468/568 = 0.824 keeps its mask and the rest its class label "
        "only (SemiSeg-CAW's class-only images; the supervised rows do not see them), or all keep their masks "
        "(full data). Test: test.txt, each image at its original size. Seeds pair the rows (the same "
        "validation images and labelled subset per seed).",
        "",
        "Tests: per-image Wilcoxon signed-rank test of the Dice of B − A (each image's Dice averaged over the "
        "seeds), and a run-level two-sided paired t-test over the seeds' mean Dice; A is the supervised row "
        "with the same labelled images.",
        "",
        "| backbone / row | preset, flags | masks / class only | seeds | Dice | IoU | paper Dice / IoU | vs | ΔDice "
        "| Wilcoxon p | run-level p | s / epoch (paper) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, preset, flags, base_name, (p_dice, p_iou, p_epoch) in rows:
        group = groups.get(name)
        if not group:
            continue
        base = groups.get(base_name) if base_name else None
        res = compare_groups([r.out for r in base or group], [r.out for r in group])
        m = res["b"]["metrics"]
        if base:
            seeds = sorted({r.seed for r in base} & {r.seed for r in group})
            p_run = reproduce.run_level_p(base, group)
            diff, p_img = f"{res['dice_diff']:+.3f}", res["wilcoxon"]["p"]
            cols = [base_name, diff, f"{p_img:.3g}", f"{p_run:.3g}"]
            beats = res["dice_diff"] > 0 and p_img < 0.05 and p_run < 0.05
            verdicts.append(
                f"- {name} {'is above' if beats else 'is not shown above'} {base_name} (ΔDice "
                f"{res['dice_diff']:+.3f}; Wilcoxon p = {p_img:.3g} over {res['n_images']} images; paired t-test "
                f"p = {p_run:.3g} over {len(seeds)} seeds)."
            )
        else:
            cols = ["—"] * 4
        lab, cls_only = counts(group[0])
        flag_text = ", ".join([f"`{preset}`"] + [f"`{k}={v}`" for k, v in flags.items()])
        epoch = np.nanmedian([seconds_per_epoch(r) for r in group])
        lines.append(
            f"| {name} | {flag_text} | {lab} / {cls_only or '–'} | {len(group)} | "
            f"{m['dice'][0]:.3f} ± {m['dice'][1]:.3f} | {m['iou'][0]:.3f} ± {m['iou'][1]:.3f} | "
            f"{p_dice:.3f} / {p_iou:.3f} | " + " | ".join(cols) + f" | {epoch:.1f} ({p_epoch if p_epoch else '—'}) |"
        )
    lines += [
        "",
        f"Paper columns: Table 1 (MALUNet rows), the backbone table (UNeXt rows, training time per epoch on "
        f"the authors' GPU); the ablation rows are from the paper's ablation table, whose full model scores "
        f"{ABLATION_FULL[0]:.3f} / {ABLATION_FULL[1]:.3f} (not Table 1's 0.684), so compare their differences. "
        "s / epoch: the median over epochs and seeds of the training steps' wall time on this machine "
        "(validation excluded), one process.",
        "",
        *verdicts,
        "",
        f"![curves]({os.path.basename(curves)})",
        "",
        "Curves (mean over seeds): validation Dice, training loss, and the teacher's pseudo-labels on a fixed "
        "check set of class-only images graded with their hidden masks (diagnosis only).",
        "",
        "Per run (test Dice at original resolution, wall time):",
        "",
    ]
    for r in runs:
        lines.append(
            f"- {r.name} seed {r.seed}: Dice {run_dice(r):.4f}, {reproduce.wall_time(r) / 60:.1f} min, "
            f"{seconds_per_epoch(r):.1f} s / epoch (`{r.out}`)"
        )
    lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _measure_row(cfg: TrainConfig, steps: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, int]:
    """(seconds per step by stage, validation pass, test pass, the run's estimate, steps per epoch),
    each (wall, CPU)."""
    tr = Trainer(cfg, overwrite=True)
    lab, unl = next(tr._batches(0))
    stages = {"step": cfg.epochs}
    if isinstance(tr.method, methods.SemiSegCAW) and cfg.semiseg_caw.class_elevate and cfg.stage1_epochs:
        stages = {"stage 1": 0, "stage 2": cfg.stage1_epochs}  # the epoch each stage's step runs at
    per_step, est = {}, np.zeros(2)
    for label, epoch in stages.items():
        ctx = {"epoch": epoch, "progress": 0.5, "warmup": False, "epochs": cfg.epochs}
        tr.train_step(lab, unl, ctx)  # first-call overheads
        per_step[label] = (
            np.array(reproduce._timed(lambda c=ctx: [tr.train_step(lab, unl, c) for _ in range(steps)])) / steps
        )
        epochs = cfg.stage1_epochs if label == "stage 1" else cfg.epochs - (cfg.stage1_epochs if len(stages) > 1 else 0)
        est += epochs * tr.steps_per_epoch * per_step[label]
    val = np.array(reproduce._timed(lambda: tr.evaluate(tr.splits.val)))
    test = np.array(reproduce._timed(lambda: tr.evaluate(tr.splits.test)))
    return per_step, val, test, est + cfg.epochs * val + test, tr.steps_per_epoch


def measure(runs: list[reproduce.Run], steps: int = 3) -> None:
    """Wall and CPU seconds per training step of each row (SemiSeg-CAW: its stage-1 and stage-2
    steps), times its steps per epoch, and the whole target's estimate (a validation pass per epoch
    and the test pass included)."""
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    total, seen = np.zeros(2), {}
    for run in runs:
        if run.name not in seen:
            cfg = dataclasses.replace(run.cfg, out=os.path.join(run.out, "_measure"))
            per_step, val, test, est, n = _measure_row(cfg, steps)
            seen[run.name] = est
            steps_text = ", ".join(
                f"{k} {v[0]:.2f} ({v[1]:.2f}) s × {n} = {v[0] * n:.0f} s/epoch" for k, v in per_step.items()
            )
            print(
                f"{run.name:28s} wall (CPU): {steps_text}; validation {val[0]:.1f} s, test {test[0]:.1f} s → "
                f"{est[0] / 3600:.1f} h ({est[1] / 3600:.1f} h) per run",
                flush=True,
            )
        total += seen[run.name]
    print(
        f"estimated total for {len(runs)} runs: {total[0] / 3600:.1f} h wall at this load, {total[1] / 3600:.1f} h CPU"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="full", choices=sorted(SCALES))
    p.add_argument("--root", default=os.path.join(REPO, "..", "shared", "data", "BUSI"))
    p.add_argument("--out", default=os.path.join(REPO, "runs", "semiseg_caw"))
    p.add_argument("--seeds", type=int, nargs="+", help=f"default: {SEEDS} ({SMOKE_SEEDS} at the smoke scale)")
    p.add_argument("--only", nargs="+", metavar="ROW", help="train these rows only (names as in ROWS)")
    p.add_argument("--epochs", type=int, help="shorter runs than the presets' (reported as another scale)")
    p.add_argument("--limit", type=int, help="a subset of this many BUSI images (reported as another scale)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process of one thread each")
    p.add_argument("--measure", action="store_true", help="time each row's steps and estimate, instead of training")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.root, "splits", "test.txt")):
        print(f"reproduce-semiseg-caw: no BUSI with split lists at {args.root} (--root)", file=sys.stderr)
        return 2
    names = [r[0] for r in ROWS]
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        print(f"reproduce-semiseg-caw: --only {unknown[0]!r}: expected one of {', '.join(names)}", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if not args.only or r[0] in args.only]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("limit", args.limit)) if v is not None}
    if args.epochs is not None:
        overrides["stage1_epochs"] = max(1, args.epochs // 5)  # the presets' fifth
    seeds = tuple(args.seeds or (SMOKE_SEEDS if args.scale == "smoke" else SEEDS))
    if len(seeds) > 1 and (args.limit or args.scale == "smoke"):
        print("reproduce-semiseg-caw: --limit draws each seed's own test images; give one seed", file=sys.stderr)
        return 2
    runs = plan(args.scale, os.path.abspath(args.root), args.out, seeds, rows, overrides)
    if args.measure:
        measure(runs)
        return 0
    t0 = time.time()
    finished = train_all(runs, args.jobs)
    reproduce._add_elapsed(runs, time.time() - t0)
    if not finished:
        return 130
    full = args.scale == "full" and not overrides and not args.only and len(seeds) >= 3
    report = (
        os.path.join(REPO, "benchmarks", "SEMISEG_CAW.md")
        if full
        else os.path.join(os.path.dirname(os.path.dirname(runs[0].out)), "SEMISEG_CAW.md")
    )
    command = "make reproduce-semiseg-caw" + ("" if full else f" ({' '.join(argv or sys.argv[1:])})")
    print(f"report: {write_report(runs, args.scale, report, command, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
