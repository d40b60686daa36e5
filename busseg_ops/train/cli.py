"""`busseg` command line: train | eval | predict | compare | export (examples: docs/methods.md).

A mistake in the input prints one line and exits with status 2 (`--debug`: the traceback). Each
subcommand imports the code it needs, so that `busseg --help` costs no more than importing busseg_ops."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import typing

from . import config
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the whole usage first) and no
    abbreviations (`--epoch` must not be taken for `--epochs`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """--version: the package's and torch's (imported with busseg_ops anyway)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        from .. import __version__

        print(f"busseg {__version__} (torch {torch.__version__})")
        parser.exit(0)


def _default_text(value) -> str:
    return "off" if value is False else "on" if value is True else "none" if value is None else str(value)


def _non_negative(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 0")
    return value


def _add_option(group, f, hint) -> None:
    """The flag of settings field `f` (type `hint`) in argparse group `group`."""
    meta = f.metadata
    help_text = f"{meta['help']} (default: {_default_text(f.default)})"
    if hint is bool:
        group.add_argument(config.flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if typing.get_args(hint) else hint
    kw = dict(choices=meta["choices"]) if meta["choices"] else dict(metavar=f.name.upper())
    group.add_argument(config.flag(f.name), type=base, default=None, help=help_text, **kw)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One argparse group per help section of the shared settings, then one per settings group
    (cfg.pseudo, cfg.<method>); every flag's destination is the setting's name."""
    sections = {key: p.add_argument_group(title) for key, title in config.SECTIONS.items()}
    for f in dataclasses.fields(config.TrainConfig):
        if f.name not in config.GROUP_KEYS:
            _add_option(sections[f.metadata["section"]], f, config.TYPES[f.name])
    for settings in config.methods.GROUPS.values():
        group = p.add_argument_group(settings.title)
        for f in dataclasses.fields(settings):
            _add_option(group, f, config.TYPES[f.name])


def _train_description() -> str:
    lines = ["Train a method; the teacher is evaluated every epoch and on the test split at the end.", "", "methods:"]
    for name, sentence in config.METHODS.items():
        lines += textwrap.wrap(sentence, 96, initial_indent=f"  {name:12s}", subsequent_indent=" " * 14)
    lines += ["", f"presets (--preset; data roots are flags): {', '.join(config.presets())}"]
    return "\n".join(lines)


def _explicit(args) -> dict:
    """The settings given as flags, by name."""
    return {name: getattr(args, name) for name in config.PLACE if getattr(args, name) is not None}


def cmd_train(args) -> int:
    from . import checkpoint, engine

    values = {}
    if args.preset:
        values.update(config.load_file(config.preset_path(args.preset), "--preset"))
    if args.config:
        values.update(config.load_file(args.config))
    values.update(_explicit(args))
    resume = None
    if args.resume:
        resume = checkpoint.load(args.resume)
        checkpoint.require(resume, checkpoint.TRAINING_KEYS, args.resume)
        checkpoint.check_progress(resume, args.resume)
        stored = config.flatten(resume["config"], f"checkpoint {args.resume}")
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
    res = engine.run(cfg, resume=resume, overwrite=args.overwrite, resume_path=args.resume)
    if res.get("stopped"):
        return 130
    if "dice" in res:
        print(
            f"{cfg.method}: test Dice {res['dice'][0]:.4f} ± {res['dice'][1]:.4f}, IoU {res['iou'][0]:.4f}, "
            f"HD95 {res['hd95'][0]:.2f} px  ({res['wall_s']:.0f} s) → {cfg.out}"
        )
    return 0


def cmd_export(args) -> int:
    from . import export

    meta = export.export(args.checkpoint, args.output, args.which, args.format, args.overwrite)
    method = meta["config"]["method"]
    if args.format == "pt2":
        print(
            f"{args.output}: the {args.which} of a {method} run as a torch.export program; it needs torch only:\n"
            f"  logits = torch.export.load({args.output!r}).module()(x)\n"
            f"  x: {export.INPUT}\n  logits: {export.OUTPUT}"
        )
    else:
        meta_path = os.path.splitext(args.output)[0] + ".json"
        print(
            f"{args.output}: the {args.which}'s weights of a {method} run (the network takes {export.INPUT}); "
            f"its config: {meta_path}\n"
            "load: from busseg_ops.train import TrainConfig, engine; "
            f"model = engine.build_model(TrainConfig.from_dict(json.load(open({meta_path!r})))); "
            f"model.load_state_dict(torch.load({args.output!r}))"
        )
    return 0


def _check_results_folder(out: str, overwrite: bool) -> None:
    """`busseg eval`'s output folder must not hold earlier results, unless `overwrite` (which
    deletes them first: no old overlays mixed with the new ones)."""
    import shutil

    old = [f for f in ("test_per_image.csv", "test_metrics.json", "overlays") if os.path.lexists(os.path.join(out, f))]
    if old and not overwrite:
        raise UserError(
            f"--out {out}: holds earlier results ({', '.join(old)}); choose another --out or pass --overwrite"
        )
    if os.path.isdir(os.path.join(out, "overlays")):
        shutil.rmtree(os.path.join(out, "overlays"))


def cmd_eval(args) -> int:
    from . import data, engine
    from .evaluate import evaluate, write_results
    from .export import load_network

    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint: no file at {args.checkpoint}")
    model, cfg = load_network(args.checkpoint)
    for k in ("data", "root", "split_mode", "split_dir", "mask_dir", "limit", "val_from_train"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    cfg.validate()
    splits = data.splits_for(cfg)
    print(splits.banner(), flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    _check_results_folder(out, args.overwrite)
    res = evaluate(
        model,
        getattr(splits, args.split),
        window=args.window,
        fov=cfg.fov,
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
    warning = engine.background_warning(res, cfg)
    if warning:
        print(warning)
    print(f"per-image results in {out}/test_per_image.csv, overlays in {out}/overlays")
    return 0


OUTPUT_SUFFIXES = ("_pred", "_overlay")  # what predict writes beside each image's stem


def cmd_predict(args) -> int:
    import torch

    from . import data, visualize
    from .evaluate import predict_masks
    from .export import load_network

    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint: no file at {args.checkpoint}")
    skipped = {"masks": 0, "earlier outputs": 0}
    if os.path.isdir(args.input):
        items = []
        for it in data.folder_items(args.input):  # without the files named as masks
            stem = os.path.splitext(it.name)[0]
            if stem.endswith(OUTPUT_SUFFIXES):
                skipped["earlier outputs"] += 1
            else:
                items.append(it)
        stems = [os.path.splitext(n) for n in os.listdir(args.input)]
        skipped["masks"] = sum(ext.lower() in data.IMAGE_EXTS and data.is_mask_name(stem) for stem, ext in stems)
    elif os.path.isfile(args.input):
        items = [data.Item(os.path.basename(args.input), args.input)]
    else:
        raise UserError(f"predict: no image or folder at {args.input}")
    if not items:
        raise UserError(f"predict: no images to segment in {args.input}")
    out = args.out
    plan = {}  # output path → input item
    for it in items:
        stem = os.path.splitext(it.name)[0]
        for suffix in OUTPUT_SUFFIXES:
            plan[os.path.join(out, f"{stem}{suffix}.png")] = it
    inputs = {os.path.realpath(it.image) for it in items}
    clash = next((p for p in plan if os.path.realpath(p) in inputs), None)
    if clash:
        raise UserError(f"predict: the output {clash} would replace an input image; choose another --out")
    existing = [p for p in plan if os.path.lexists(p)]
    holds_inputs = os.path.isdir(out) and any(os.path.dirname(p) == os.path.realpath(out) for p in inputs)
    if (existing or holds_inputs) and not args.overwrite:
        what = f"earlier predictions (e.g. {os.path.basename(existing[0])})" if existing else "the input images"
        raise UserError(f"--out {out}: holds {what}; choose another --out, or pass --overwrite")
    bad = next((p for p in existing if os.path.islink(p) or not os.path.isfile(p)), None)
    if bad:
        raise UserError(f"predict: {bad} is a link or not a regular file; it is not replaced")
    model, cfg = load_network(args.checkpoint)
    for it in items:
        img = data.read_gray(it.image)
        x = torch.from_numpy(img.copy()).float().div(255)[None, None]
        m = predict_masks(model, x, window=args.window, fov=cfg.fov)[0].numpy().astype("uint8")  # at its own size
        stem = os.path.splitext(it.name)[0]
        visualize.save_png(m * 255, os.path.join(out, f"{stem}_pred.png"))
        visualize.save_png(visualize.overlay(img, m), os.path.join(out, f"{stem}_overlay.png"))
    left = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
    print(
        f"{len(items)} image(s) segmented into {out} (<name>_pred.png: mask 0/255, <name>_overlay.png)"
        + (f"; skipped {left}" if left else "")
    )
    return 0


def cmd_compare(args) -> int:
    from .evaluate import compare_groups, expand_runs, format_comparison

    if args.vs is None:
        if len(args.runs) != 2:
            raise UserError("compare: give two runs (A B), or groups: A1 A2 ... --vs B1 B2 ...")
        runs_a, runs_b = expand_runs(args.runs[:1], "compare"), expand_runs(args.runs[1:], "compare")
    else:
        runs_a, runs_b = expand_runs(args.runs, "compare"), expand_runs(args.vs, "compare --vs")
    print(format_comparison(compare_groups(runs_a, runs_b)))
    return 0


OVERWRITE_HELP = {
    "train": "replace a run in --out: its files are deleted first (default: off: such an --out is refused; "
    "continue a run with --resume)",
    "eval": "replace earlier results in --out (default: off: refused)",
    "predict": "replace earlier predictions, or write into the folder of the images (never over an image; "
    "default: off: refused)",
    "export": "replace an existing file (never the checkpoint, a link, a special file or another file of a run; "
    "default: off: refused)",
}
WINDOW_HELP = (
    "sliding window: tiles of N×N pixels (half-window overlap) for larger images; 0: the whole image (default: 0)"
)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors (default: off)"
    )
    p = _Parser(prog="busseg", description="Semi-supervised BUS lesion segmentation")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of one line (default: off)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
        "--preset",
        choices=config.presets(),
        metavar="NAME",
        help="a shipped paper protocol (listed above; default: none)",
    )
    start.add_argument(
        "--config", help="YAML or JSON config: our flat keys or upstream's nested layout (default: none)"
    )
    start.add_argument(
        "--resume",
        help="checkpoint to continue from (bit-for-bit on CPU); restores its config, flags override (default: none)",
    )
    start.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["train"])
    _add_config_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint's teacher on a split",
        parents=[common],
        description="Evaluate a checkpoint's teacher, each image at its original size; the data options "
        "override the checkpoint's (default: the checkpoint's data and split).",
    )
    e.add_argument("--checkpoint", required=True, help="a busseg checkpoint (best.pt, last.pt); required")
    e.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "labeled", "unlabeled"],
        help="which set to evaluate on (default: test)",
    )
    e.add_argument("--out", help="results folder (default: eval/ beside the checkpoint)")
    e.add_argument("--window", type=_non_negative, default=0, metavar="N", help=WINDOW_HELP)
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["eval"])
    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    for name, typ in (
        ("data", str),
        ("root", str),
        ("split_mode", str),
        ("split_dir", str),
        ("mask_dir", str),
        ("limit", int),
        ("val_from_train", int),
    ):
        f = fields[name]
        kw = dict(choices=f.metadata["choices"]) if f.metadata["choices"] else dict(metavar=name.upper())
        e.add_argument(config.flag(name), type=typ, help=f"{f.metadata['help']} (default: the checkpoint's)", **kw)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "predict",
        help="segment an image or a folder of images (each at its own size)",
        parents=[common],
        description="Segment images with a checkpoint's teacher, each at its own size: <name>_pred.png (mask "
        "0/255) and <name>_overlay.png per image. In a folder, files named as masks (<name>_mask.png, "
        "<name>_mask_1.png, ...) and earlier outputs are skipped.",
    )
    r.add_argument("input", help="an image file, or a folder of images")
    r.add_argument("--checkpoint", required=True, help="a busseg checkpoint (best.pt, last.pt); required")
    r.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    r.add_argument("--window", type=_non_negative, default=0, metavar="N", help=WINDOW_HELP)
    r.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["predict"])
    r.set_defaults(func=cmd_predict)

    c = sub.add_parser(
        "compare",
        help="runs or groups of runs (seeds) on their common test images: metrics mean ± std over runs, "
        "Wilcoxon signed-rank test on per-image Dice",
        parents=[common],
    )
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders, test_per_image.csv files or globs (group A)")
    c.add_argument("--vs", nargs="+", metavar="RUN", help="group B (default: none: exactly two runs A B are compared)")
    c.set_defaults(func=cmd_compare)

    x = sub.add_parser(
        "export",
        help="write a checkpoint's network as a file that runs without busseg_ops (torch.export .pt2)",
        parents=[common],
        description="Export a checkpoint's network. pt2: a torch.export program (torch alone loads and runs it); "
        "state-dict: the weights and a .json config beside them (rebuilding the network needs busseg_ops).",
    )
    x.add_argument("checkpoint", help="a busseg checkpoint (best.pt, last.pt)")
    x.add_argument("output", help="the file to write: NAME.pt2 (pt2), or the state dict (NAME.json beside it)")
    x.add_argument("--format", choices=["pt2", "state-dict"], default="pt2", help="what to write (default: pt2)")
    x.add_argument(
        "--which",
        choices=["teacher", "student"],
        default="teacher",
        help="network to export (default: teacher, the one evaluated)",
    )
    x.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["export"])
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
