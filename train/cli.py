"""`busseg` command line: train | eval | predict | compare.

  busseg train --method rabusseg --data busi --root DIR --partition 1/4 --epochs N [--config c.yaml]
  busseg train ... --resume runs/x/last.pt
  busseg eval --checkpoint runs/x/best.pt [--data busi --root DIR] [--out DIR] [--window N]
  busseg predict IMAGE_OR_DIR --checkpoint runs/x/best.pt [--out DIR] [--window N]
  busseg compare runs/a runs/b          # Wilcoxon signed-rank p on per-image test Dice
  busseg compare 'runs/sup_s*' --vs 'runs/ra_s*'   # seeds: mean ± std, Wilcoxon on seed means

Evaluation and prediction take each image at its original size (evaluate.py).

Every TrainConfig field is an option (`--cra-strategy random`, `--no-arp`, ...); a YAML or JSON
config file gives defaults that the command line overrides. Multi-process: `torchrun
--nproc_per_node 2 -m busseg_ops.train train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

import torch

from . import checkpoint, data, engine, visualize
from .errors import UserError
from .evaluate import compare_groups, evaluate, expand_runs, format_comparison, predict_masks, write_results


def _config_file(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as err:
            raise SystemExit(f"{path}: PyYAML is not installed; use a JSON config or `pip install pyyaml`") from err
        return yaml.safe_load(text) or {}
    return json.loads(text)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(engine.TrainConfig)
    for f in dataclasses.fields(engine.TrainConfig):
        if f.name == "extra":
            continue
        opt = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        if t is bool:
            p.add_argument(opt, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = next((a for a in typing.get_args(t) if a is not type(None)), t) if typing.get_args(t) else t
            p.add_argument(opt, type=base, default=None, metavar=f.name.upper())


def _train_config(args) -> engine.TrainConfig:
    values = _config_file(args.config) if args.config else {}
    for f in dataclasses.fields(engine.TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return engine.TrainConfig.from_dict(values)


def cmd_train(args) -> int:
    cfg = _train_config(args)
    res = engine.run(cfg, resume=args.resume)
    if res.get("stopped"):
        return 130
    if "dice" in res:
        print(
            f"{cfg.method}: test Dice {res['dice'][0]:.4f} ± {res['dice'][1]:.4f}, IoU {res['iou'][0]:.4f}, "
            f"HD95 {res['hd95'][0]:.2f} px  ({res['wall_s']:.0f} s) → {cfg.out}"
        )
    return 0


def _model_from_checkpoint(path: str):
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint: no file at {path}")
    st = checkpoint.load(path)
    cfg = engine.TrainConfig.from_dict(st["config"])
    model = engine.build_model(cfg)
    model.load_state_dict(st["teacher"])  # evaluation is on the teacher
    return model.eval(), cfg


def cmd_eval(args) -> int:
    model, cfg = _model_from_checkpoint(args.checkpoint)
    for k in ("data", "root", "split_dir", "mask_dir", "limit", "val_from_train"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    splits = data.make_splits(
        cfg.data,
        cfg.root,
        cfg.partition,
        cfg.seed,
        cfg.split_dir,
        cfg.synthetic_n,
        cfg.limit,
        cfg.mask_dir,
        val_count=cfg.val_from_train,
    )
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    res = evaluate(
        model,
        getattr(splits, args.split),
        window=args.window,
        synthetic_size=cfg.size,
        overlay_dir=os.path.join(out, "overlays"),
        overlays=cfg.overlays,
        progress=True,
    )
    write_results(res, out, method=cfg.method)
    print(f"{len(res['per_image'])} {args.split} images, each at its original size")
    for k, (m, s) in res["summary"].items():
        print(f"{k:12s} {m:.4f} ± {s:.4f}")
    for k, v in res.get("classification", {}).items():
        print(f"cls_{k:8s} {v:.4f}")
    print(f"per-image results in {out}/test_per_image.csv, overlays in {out}/overlays")
    return 0


def cmd_predict(args) -> int:
    model, _ = _model_from_checkpoint(args.checkpoint)
    if os.path.isdir(args.input):
        items = data.folder_items(args.input)
    elif os.path.isfile(args.input):
        items = [data.Item(os.path.basename(args.input), args.input)]
    else:
        raise UserError(f"predict: no image or folder at {args.input}")
    out = args.out or "predictions"
    for it in items:
        img = data.read_gray(it.image)
        x = torch.from_numpy(img.copy()).float().div(255)[None, None]
        m = predict_masks(model, x, window=args.window)[0].numpy().astype("uint8")  # at the image's own size
        stem = os.path.splitext(it.name)[0]
        visualize.save_png(m * 255, os.path.join(out, f"{stem}_mask.png"))
        visualize.save_png(visualize.overlay(img, m), os.path.join(out, f"{stem}_overlay.png"))
    print(f"{len(items)} prediction(s) written to {out} (*_mask.png, *_overlay.png)")
    return 0


def cmd_compare(args) -> int:
    if args.vs is None:
        if len(args.runs) != 2:
            raise UserError("compare: give two runs (A B), or groups: A1 A2 ... --vs B1 B2 ...")
        runs_a, runs_b = expand_runs(args.runs[:1], "compare"), expand_runs(args.runs[1:], "compare")
    else:
        runs_a, runs_b = expand_runs(args.runs, "compare"), expand_runs(args.vs, "compare --vs")
    print(format_comparison(compare_groups(runs_a, runs_b)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="busseg", description="Semi-supervised BUS lesion segmentation")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a method")
    t.add_argument("--config", help="YAML (needs PyYAML) or JSON file with TrainConfig fields")
    t.add_argument("--resume", help="checkpoint to continue from (bit-for-bit on CPU)")
    _add_config_options(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint's teacher on a split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", default="test", choices=["test", "val", "labeled", "unlabeled"])
    e.add_argument("--out")
    window_help = "sliding window: tiles of N×N pixels (half-window overlap) for larger images; 0: whole image"
    e.add_argument("--window", type=int, default=0, metavar="N", help=window_help)
    for k, typ in (
        ("data", str),
        ("root", str),
        ("split-dir", str),
        ("mask-dir", str),
        ("limit", int),
        ("val-from-train", int),
    ):
        e.add_argument("--" + k, type=typ)
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("predict", help="segment an image or a folder of images (each at its own size)")
    r.add_argument("input")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out")
    r.add_argument("--window", type=int, default=0, metavar="N", help=window_help)
    r.set_defaults(func=cmd_predict)
    c = sub.add_parser(
        "compare",
        help="runs or groups of runs (seeds) on their common test images: metrics mean ± std over runs, "
        "Wilcoxon signed-rank test on per-image Dice",
    )
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders, test_per_image.csv files or globs (group A)")
    c.add_argument("--vs", nargs="+", metavar="RUN", help="group B; without it exactly two runs A B are compared")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"busseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
