"""`busseg` command line: train | eval | predict | compare | export.

  busseg train --method rabusseg --data busi --root DIR --partition 1/4 --epochs N
  busseg train --preset rabusseg_busi_1_4 --root DIR [--pretrained resnet50.pth]
  busseg train --config c.yaml        # our flat keys or the upstream nested layout
  busseg train --resume runs/x/last.pt [--epochs 300]   # the stored config; flags override
  busseg eval --checkpoint runs/x/best.pt [--data busi --root DIR] [--out DIR] [--window N]
  busseg predict IMAGE_OR_DIR --checkpoint runs/x/best.pt [--out DIR] [--window N]
  busseg compare runs/a runs/b          # Wilcoxon signed-rank p on per-image test Dice
  busseg compare 'runs/sup_s*' --vs 'runs/ra_s*'   # seeds: mean ± std, Wilcoxon on seed means
  busseg export runs/x/best.pt model.pt # the teacher's weights as a plain state dict

Evaluation and prediction take each image at its original size (evaluate.py).

Every TrainConfig field is a `train` option with its help and default (`busseg train --help`);
a preset, then a config file, then the flags: each overrides the one before. A mistake in the
input (a bad path, file, value or combination of flags) prints one line and exits with status 2;
`--debug` shows the traceback instead. Multi-process: `torchrun --nproc_per_node 2 -m
busseg_ops.train train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import typing

import torch

from . import checkpoint, config, data, engine, visualize
from .errors import UserError
from .evaluate import compare_groups, evaluate, expand_runs, format_comparison, predict_masks, write_results


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_text(value) -> str:
    return "off" if value is False else "on" if value is True else "none" if value is None else str(value)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(config.TrainConfig)
    groups = {key: p.add_argument_group(title) for key, title in config.GROUPS.items()}
    for f in dataclasses.fields(config.TrainConfig):
        meta, t = f.metadata, hints[f.name]
        g = groups[meta["group"]]
        help_text = f"{meta['help']} (default: {_default_text(f.default)})"
        if t is bool:
            g.add_argument(config.flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        base = next((a for a in typing.get_args(t) if a is not type(None)), t) if typing.get_args(t) else t
        kw = dict(choices=meta["choices"]) if meta["choices"] else dict(metavar=f.name.upper())
        g.add_argument(config.flag(f.name), type=base, default=None, help=help_text, **kw)


def _train_description() -> str:
    lines = ["Train a method; the teacher is evaluated every epoch and on the test split at the end.", "", "methods:"]
    for name, sentence in config.METHODS.items():
        lines += textwrap.wrap(sentence, 96, initial_indent=f"  {name:12s}", subsequent_indent=" " * 14)
    lines += ["", f"presets (--preset; data roots are flags): {', '.join(config.presets())}"]
    return "\n".join(lines)


def _explicit(args) -> dict:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config.TrainConfig)
        if getattr(args, f.name) is not None
    }


def cmd_train(args) -> int:
    values = {}
    if args.preset:
        values.update(config.load_file(config.preset_path(args.preset), "--preset"))
    if args.config:
        values.update(config.load_file(args.config))
    values.update(_explicit(args))
    resume = None
    if args.resume:
        resume = checkpoint.load(args.resume)
        stored = resume["config"]
        cfg = config.TrainConfig.from_dict({**stored, **values}, source=f"checkpoint {args.resume}")
        changed = [f"{config.flag(k)} {stored.get(k)!r} → {v!r}" for k, v in values.items() if stored.get(k) != v]
        print(
            f"resuming {args.resume}: {cfg.method} on {cfg.data}{' ' + cfg.root if cfg.root else ''}, "
            f"{resume['epoch']} of {cfg.epochs} epochs done"
            + (f" and {resume['step_in_epoch']} step(s)" if resume["step_in_epoch"] else "")
            + f", output {cfg.out}"
            + (f"; overriding {', '.join(changed)}" if changed else ""),
            flush=True,
        )
    else:
        cfg = config.TrainConfig.from_dict(values, source="options")
    res = engine.run(cfg, resume=resume)
    if res.get("stopped"):
        return 130
    if "dice" in res:
        print(
            f"{cfg.method}: test Dice {res['dice'][0]:.4f} ± {res['dice'][1]:.4f}, IoU {res['iou'][0]:.4f}, "
            f"HD95 {res['hd95'][0]:.2f} px  ({res['wall_s']:.0f} s) → {cfg.out}"
        )
    return 0


def cmd_export(args) -> int:
    try:
        cfg = checkpoint.export(args.checkpoint, args.output, args.which)
        meta = os.path.splitext(args.output)[0] + ".json"
        with open(meta, "w") as f:
            json.dump(cfg, f, indent=2)
    except OSError as err:
        raise UserError(f"{args.output}: cannot write there ({err.strerror or err})") from None
    print(
        f"{args.output}: the {args.which}'s weights of a {cfg['method']} run (the network takes (B, 1, H, W) "
        f"gray in [0, 1]); its config: {meta}\n"
        "load: from busseg_ops.train import TrainConfig, engine; "
        f"model = engine.build_model(TrainConfig.from_dict(json.load(open({meta!r})))); "
        f"model.load_state_dict(torch.load({args.output!r}))"
    )
    return 0


def _model_from_checkpoint(path: str):
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint: no file at {path}")
    st = checkpoint.load(path)
    cfg = config.TrainConfig.from_dict(st["config"], source=f"checkpoint {path}")
    model = engine.build_model(cfg)
    model.load_state_dict(st["teacher"])  # evaluation is on the teacher
    return model.eval(), cfg


def cmd_eval(args) -> int:
    model, cfg = _model_from_checkpoint(args.checkpoint)
    for k in ("data", "root", "split_dir", "mask_dir", "limit", "val_from_train"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    splits = data.splits_for(cfg)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    res = evaluate(
        model,
        getattr(splits, args.split),
        window=args.window,
        synthetic_size=cfg.synthetic_size,
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    p = _Parser(prog="busseg", description="Semi-supervised BUS lesion segmentation")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a method",
        parents=[common],
        usage="busseg train [--preset NAME] [--config FILE] [--resume CHECKPOINT] [options]",
        description=_train_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start = t.add_argument_group("where the config comes from (each overrides the one before; flags last)")
    start.add_argument(
        "--preset", choices=config.presets(), metavar="NAME", help="a shipped paper protocol (listed above)"
    )
    start.add_argument("--config", help="YAML or JSON config: our flat keys or upstream's nested layout")
    start.add_argument(
        "--resume", help="checkpoint to continue from (bit-for-bit on CPU); restores its config, flags override"
    )
    _add_config_options(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint's teacher on a split", parents=[common])
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
    r = sub.add_parser(
        "predict", help="segment an image or a folder of images (each at its own size)", parents=[common]
    )
    r.add_argument("input")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out")
    r.add_argument("--window", type=int, default=0, metavar="N", help=window_help)
    r.set_defaults(func=cmd_predict)
    c = sub.add_parser(
        "compare",
        help="runs or groups of runs (seeds) on their common test images: metrics mean ± std over runs, "
        "Wilcoxon signed-rank test on per-image Dice",
        parents=[common],
    )
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders, test_per_image.csv files or globs (group A)")
    c.add_argument("--vs", nargs="+", metavar="RUN", help="group B; without it exactly two runs A B are compared")
    c.set_defaults(func=cmd_compare)
    x = sub.add_parser(
        "export", help="write a checkpoint's weights as a plain state dict (+ its config as JSON)", parents=[common]
    )
    x.add_argument("checkpoint", help="a busseg checkpoint (best.pt, last.pt)")
    x.add_argument("output", help="the state dict to write (model.pt); the config goes to model.json beside it")
    x.add_argument(
        "--which",
        choices=["teacher", "student"],
        default="teacher",
        help="weights to export (default: teacher, the one evaluated)",
    )
    x.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"busseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
