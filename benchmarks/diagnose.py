"""`make diagnose`: why the semi-supervised methods do or do not beat suponly on BUSI, from ablations
judged on the validation split only (the test images are never touched).

    .venv/bin/python benchmarks/diagnose.py [--seeds 0 1] [--only NAME ...] [--jobs N] [--root DIR] [--out DIR]

Every variant below runs at `make reproduce`'s full scale and continues from one shared checkpoint per
seed taken at the end of the supervised-only warm-up: those epochs train L_s alone for every method
(U2PL's sup_only epochs), so they are the same for all of them and are trained once. Each variant then
trains the remaining epochs and is scored by its best validation Dice (the split carved from the
unlabelled training images) and by its per-epoch logs: every loss term, the teacher's pseudo-labels
graded on a fixed check set of unlabelled images with their hidden masks (diagnosis only, never used for
training), the share of pixels each filter keeps, and the contrastive term's anchors, negatives, bank
fill and cosines. Resumable: a finished variant (diagnosis.json) is skipped, an interrupted one
continues from its last.pt. Writes benchmarks/diagnosis.md and benchmarks/diagnosis_curves.png; `make
reproduce` includes them in REPRODUCTION.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import multiprocessing
import os
import shutil
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (the scale, the protocol and the method rows are reproduce's)
import torch.nn.functional as F  # noqa: E402

import busseg_ops  # noqa: E402
from busseg_ops.train import TrainConfig, Trainer, checkpoint, data, engine, evaluate  # noqa: E402

REPO = reproduce.REPO
ROWS = {name: flags for name, flags, _ in reproduce.RUNS}
# (name, flags, what it isolates). Each row starts from reproduce's row of the same method.
VARIANTS = [
    ("suponly", ROWS["suponly"], "the baseline"),
    ("rabusseg", ROWS["rabusseg"], "RA-BUSSeg as reproduced (upstream config: no cutmix)"),
    ("rabusseg +cutmix", {**ROWS["rabusseg"], "cutmix_p": 1.0}, "a cutmix box on every unlabelled image"),
    ("rabusseg no L_u", {**ROWS["rabusseg"], "lambda_u": 0.0}, "ARP and CRA alone"),
    ("rabusseg no ARP", {**ROWS["rabusseg"], "arp": False}, "L_u and CRA"),
    ("rabusseg no CRA", {**ROWS["rabusseg"], "cra": False}, "L_u and ARP"),
    ("rabusseg eval teacher", {**ROWS["rabusseg"], "teacher_train_mode": False}, "L_u's entropy from the eval teacher"),
    ("phnet", ROWS["phnet"], "PH-Net as reproduced (the released HPC, L_u and APA)"),
    ("phnet no HPC", {**ROWS["phnet"], "hpc": False}, "APA and L_u alone"),
    ("phnet no APA", {**ROWS["phnet"], "apa": False}, "box cutmix instead of the patch cutmix"),
    ("phnet ramp APA", {**ROWS["phnet"], "apa_mix": "ramp"}, "the paper's ramping shield instead of easy_easy"),
    ("phnet paper L_u", {**ROWS["phnet"], "unsup_form": "paper"}, "L_u on confidence ≥ γ instead of U2PL's"),
    ("phnet paper HPC", {**ROWS["phnet"], "hpc_form": "paper"}, "HPC as Eq. 13-15 (the class memory bank)"),
    (
        "phnet paper HPC Eq.15 negatives",
        {**ROWS["phnet"], "hpc_form": "paper", "contrast_negatives": "anchors"},
        "Eq. 13-15 with every other-class anchor",
    ),
    (
        "phnet paper HPC no MB",
        {**ROWS["phnet"], "hpc_form": "paper", "mb": False},
        "Eq. 13-15 with the batch's class means as positives",
    ),
    # The trend with scale: these change the schedule or the crop, so they train from scratch and
    # are compared with suponly at the same scale.
    ("suponly 24 epochs", {**ROWS["suponly"], "epochs": 24}, "the baseline, twice the schedule"),
    ("rabusseg 24 epochs", {**ROWS["rabusseg"], "epochs": 24}, "RA-BUSSeg, twice the schedule"),
    ("suponly 192 px", {**ROWS["suponly"], "crop": 192}, "the baseline, 192-px crops"),
    ("rabusseg 192 px", {**ROWS["rabusseg"], "crop": 192}, "RA-BUSSeg, 192-px crops"),
]
VARIANTS_BY_NAME = {n: f for n, f, _ in VARIANTS}
SCALE_FIELDS = ("epochs", "crop", "max_steps", "warmup_epochs", "lr")  # a change: no shared warm-up
COST = {"phnet": 2.0, "rabusseg": 0.7, "suponly": 0.3}  # CPU s/step (reproduce's NOTE): the order of work


def config(name: str, flags: dict, seed: int, root: str, out: str) -> TrainConfig:
    fields = {**reproduce.COMMON, **reproduce.SCALES["full"], "root": root, "seed": seed, "quiet": True}
    slug = name.replace(" ", "_").replace("+", "plus_").replace(".", "")
    return TrainConfig(**{**fields, **flags, "overlays": 0, "out": os.path.join(out, slug, f"seed{seed}")})


def scale_of(flags: dict) -> dict:
    return {k: flags[k] for k in SCALE_FIELDS if k in flags}


def baseline_of(name: str) -> str:
    """The suponly variant at the same scale as `name` (its Δ column's reference)."""
    scale = scale_of(VARIANTS_BY_NAME.get(name, {}))
    return next(n for n, f, _ in VARIANTS if f["method"] == "suponly" and scale_of(f) == scale)


def warm_up(seed: int, root: str, out: str) -> str:
    """The shared warm-up checkpoint of `seed` (trained once, suponly's first warmup_epochs)."""
    torch.set_num_threads(1)
    cfg = config("warm-up", ROWS["suponly"], seed, root, out)
    path = os.path.join(cfg.out, "last.pt")
    tr = Trainer(cfg, overwrite=True)  # without last.pt the warm-up starts afresh in its own folder
    if os.path.isfile(path):
        tr.load_state_dict(checkpoint.load(path))
    if tr.epoch < cfg.warmup_epochs:
        tr.fit(until=cfg.warmup_epochs, test=False)
    return cfg.out


def train_variant(name: str, flags: dict, seed: int, root: str, out: str) -> dict:
    torch.set_num_threads(1)
    cfg = config(name, flags, seed, root, out)
    done = os.path.join(cfg.out, "diagnosis.json")
    if os.path.isfile(done):
        return json.load(open(done))
    tr = Trainer(cfg, overwrite=True)  # a variant without a checkpoint starts afresh in its own folder
    last = os.path.join(cfg.out, "last.pt")
    if os.path.isfile(last) and checkpoint.load(last)["global_step"] > 0:
        tr.load_state_dict(checkpoint.load(last))  # an interrupted variant
    elif not scale_of(flags):
        warm = warm_up(seed, root, out)
        tr.warm_start(checkpoint.load(os.path.join(warm, "last.pt")))  # its heads fresh, as drawn
        shutil.copy(os.path.join(warm, "metrics.csv"), os.path.join(cfg.out, "metrics.csv"))
    t0 = time.time()
    res = tr.fit(test=False)
    if res.get("stopped"):
        return res
    rows = list(csv.DictReader(open(os.path.join(cfg.out, "metrics.csv"))))
    semi = [float(r["val_dice"]) for r in rows[cfg.warmup_epochs :]]
    result = {"name": name, "seed": seed, "best_val": max(semi), "last_val": semi[-1], "wall_s": time.time() - t0}
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def hard_patch_quality(name: str, seed: int, root: str, out: str) -> dict:
    """The final teacher's pseudo-labels on the check set (hidden masks, diagnosis only): accuracy on
    all pixels, on the pixels L_u keeps (phnet: confidence ≥ γ) and in the k hardest patches of each
    image, where HPC takes its anchors (k = ⌊β·N²⌋ of the N×N grid, as at the end of training), and
    there the share of lesion pseudo-labels that are lesion (precision)."""
    cfg = config(name, dict(VARIANTS_BY_NAME[name]), seed, root, out)
    model = engine.build_model(cfg)
    model.load_state_dict(checkpoint.load(os.path.join(cfg.out, "last.pt"))["teacher"])
    model.eval()
    items = engine.check_items(data.splits_for(cfg), cfg.pseudo_label_check, cfg.seed)
    n = cfg.phnet.num_patches
    k = max(1, busseg_ops.shield_count(cfg.phnet.beta, 1.0, n * n))

    def hardest(prob, cls):  # the patch grid needs sides divisible by N: hardness on a resized copy
        h, w = prob.shape[-2:]
        grid = F.interpolate(prob, size=(n * -(-h // n), n * -(-w // n)), mode="bilinear", align_corners=False)
        hardness = busseg_ops.patch_entropy_hardness(grid, num_patches=n)
        pl = prob.argmax(1)
        return busseg_ops.reliable_hard_pixels(pl, pl, hardness, k, (h, w)).hard  # HPC's own patch selection

    counts = dict.fromkeys(("all", "all_ok", "conf", "conf_ok", "hard", "hard_ok", "hard_les", "hard_les_ok"), 0)
    with torch.no_grad():
        for item in items:
            img, mask = data.load_item(item, cfg.synthetic_size)
            prob = evaluate.predict(model, evaluate.image_tensor(img))["prob"]
            pl, gt = prob.argmax(1)[0], torch.from_numpy(mask).long()
            ok, conf, hard = pl == gt, prob.amax(1)[0] >= cfg.pseudo.gamma, hardest(prob, None)[0]
            lesion = hard & (pl == 1)
            for key, sel in (("all", torch.ones_like(ok)), ("conf", conf), ("hard", hard), ("hard_les", lesion)):
                counts[key] += int(sel.sum())
                counts[key + "_ok"] += int((sel & ok).sum())
    share = counts["conf"] / counts["all"]
    return {
        "acc": counts["all_ok"] / counts["all"],
        "confident_share": share,
        "confident_acc": counts["conf_ok"] / max(1, counts["conf"]),
        "hard_acc": counts["hard_ok"] / max(1, counts["hard"]),
        "hard_lesion_precision": counts["hard_les_ok"] / counts["hard_les"] if counts["hard_les"] else float("nan"),
    }


def _rows(out: str, name: str, seed: int, root: str) -> list[dict]:
    cfg = config(name, {}, seed, root, out)
    with open(os.path.join(cfg.out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def finished(out: str, root: str) -> list[dict]:
    """Every finished variant and seed under `out`, in VARIANTS order."""
    results = []
    for name, _, _ in VARIANTS:
        run = os.path.dirname(config(name, {}, 0, root, out).out)
        seeds = sorted(int(d[4:]) for d in os.listdir(run) if d.startswith("seed")) if os.path.isdir(run) else []
        for seed in seeds:
            path = os.path.join(run, f"seed{seed}", "diagnosis.json")
            if os.path.isfile(path):
                results.append(json.load(open(path)))
    return results


def _mean_curve(out, name, seeds, root, key):
    """(epochs, mean over seeds) of a metrics.csv column, as reproduce's curves; None where never logged."""
    runs = [types.SimpleNamespace(out=config(name, {}, s, root, out).out) for s in seeds]
    return reproduce._series(runs, key)


def plot(out: str, seeds: dict[str, list[int]], root: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("val_dice", "validation Dice (teacher)"),
        ("loss_s", "L_s (solid) and L_u (dashed)"),
        ("pl_dice", "pseudo-label Dice on the check set"),
        ("pl_kept", "kept share (solid), accuracy on kept pixels (dashed)"),
        ("loss_c", "phnet: L_c (solid), cos to positive (dashed), to negatives (dotted)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    styles = {"loss_s": ["loss_u"], "pl_kept": ["pl_kept_acc"], "loss_c": ["c_cos_pos", "c_cos_neg"]}
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(seeds):
            for key2, ls in zip([key] + styles.get(key, []), ["-", "--", ":"]):
                pts = _mean_curve(out, name, seeds[name], root, key2)
                if pts:
                    ax.plot(*pts, ls, color=plt.cm.tab20(i % 20), label=name if key2 == key else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("validation-only ablations from the shared warm-up, mean over each variant's seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(results: list[dict], out: str, root: str, path: str) -> str:
    names = list(dict.fromkeys(r["name"] for r in results))
    seeds = {n: [r["seed"] for r in results if r["name"] == n] for n in names}
    curves = os.path.splitext(path)[0] + "_curves.png"
    plot(out, seeds, root, curves)
    why = {n: w for n, _, w in VARIANTS}
    base = {(r["name"], r["seed"]): r["best_val"] for r in results}
    lines = [
        f"Validation-only ablations (`make diagnose`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC): "
        "every variant continues from the shared warm-up checkpoint of its seed "
        "(those that change the scale train from scratch) and is scored by its best validation Dice after the "
        "warm-up (40 images carved from the unlabelled training images). Last-epoch means of the logged "
        "diagnostics; `L_c`, `cos+` and `cos−` are the contrastive term and an anchor's mean cosine to its "
        "positive and to its negatives.",
        "",
        "| variant | what it isolates | seeds | best val Dice | Δ vs suponly (same seeds and scale) | last val Dice | "
        "L_s | L_u | L_c | cos+ | cos− | pseudo-label Dice | kept share | kept accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [r for r in results if r["name"] == name]
        best = [r["best_val"] for r in rs]
        ref = baseline_of(name)
        diff = [r["best_val"] - base[ref, r["seed"]] for r in rs if (ref, r["seed"]) in base]
        last_rows = [_rows(out, name, r["seed"], root)[-1] for r in rs]

        def m(key, rows=last_rows):
            v = [float(x[key]) for x in rows if x.get(key, "") not in ("", "nan")]
            return f"{np.mean(v):.3f}" if v else "—"

        lines.append(
            f"| {name} | {why.get(name, '')} | {', '.join(map(str, seeds[name]))} | {np.mean(best):.3f} "
            f"({', '.join(f'{b:.3f}' for b in best)}) | "
            f"{(f'{np.mean(diff):+.3f}' if diff and name != ref else '—')} | "
            f"{np.mean([r['last_val'] for r in rs]):.3f} | {m('loss_s')} | {m('loss_u')} | {m('loss_c')} | "
            f"{m('c_cos_pos')} | {m('c_cos_neg')} | {m('pl_dice')} | {m('pl_kept')} | {m('pl_kept_acc')} |"
        )
    lines += [
        "",
        f"![diagnosis curves]({os.path.basename(curves)})",
        "",
        "Where the pseudo-labels are right: the final teacher of each variant on the check set (hidden masks, "
        "diagnosis only), mean over seeds: pixel accuracy on all pixels, on the pixels whose confidence is "
        "≥ γ (phnet's L_u keeps those), and in each image's k hardest patches (where HPC takes its anchors).",
        "",
        "| variant | accuracy, all pixels | confident share | accuracy, confident | accuracy, hardest patches | "
        "lesion pseudo-labels right, hardest patches |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        q = [hard_patch_quality(name, s, root, out) for s in seeds[name]]
        avg = {k: np.mean([x[k] for x in q]) for k in q[0]}
        lines.append(
            f"| {name} | {avg['acc']:.3f} | {avg['confident_share']:.3f} | {avg['confident_acc']:.3f} | "
            f"{avg['hard_acc']:.3f} | {avg['hard_lesion_precision']:.3f} |"
        )
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.join(REPO, "..", "shared", "data", "BUSI"))
    p.add_argument("--out", default=os.path.join(REPO, "runs", "diagnose"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", help="variant names to train (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, one process of one thread each")
    p.add_argument(
        "--report", default=os.path.join(REPO, "benchmarks", "diagnosis.md"), help="the report (curves beside it)"
    )
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.root, "splits", "test.txt")):
        print(f"diagnose: no BUSI with split lists at {args.root} (--root)", file=sys.stderr)
        return 2
    unknown = set(args.only or []) - {n for n, _, _ in VARIANTS}
    if unknown:
        print(f"diagnose: --only: unknown variants {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    root = os.path.abspath(args.root)
    todo = [(n, f, s) for n, f, _ in VARIANTS if not args.only or n in args.only for s in args.seeds]
    todo.sort(key=lambda t: -COST[t[1]["method"]])
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        # The shared warm-ups first, so that parallel variants never train one twice.
        warm = sorted({s for _, f, s in todo if not scale_of(f)})
        list(pool.map(warm_up, warm, [root] * len(warm), [args.out] * len(warm)))
        futures = {pool.submit(train_variant, n, f, s, root, args.out): (n, s) for n, f, s in todo}
        for fut in concurrent.futures.as_completed(futures):
            res = fut.result()
            if res.get("stopped"):
                print("stopped; run it again to continue", flush=True)
                return 130
            print(
                f"{res['name']} seed {res['seed']}: best val Dice {res['best_val']:.4f} ({res['wall_s'] / 60:.1f} min)",
                flush=True,
            )
    print("report:", report(finished(args.out, root), args.out, root, args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
