"""Outputs never replace inputs or earlier results: `train` refuses an --out that holds a run
(finished or not) unless --overwrite, `predict` writes <stem>_pred.png and skips masks, `eval`
keeps earlier results, `export` never writes over the checkpoint, a link, a special file or
another file of a run."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image
from train_helpers import fake_busi, tiny

from busseg_ops.train import Trainer, cli, data, engine

SMALL = [
    "--synthetic-n", "24", "--synthetic-size", "64", "--crop", "64", "--epochs", "1", "--max-steps", "1",
    "--unet-base", "4", "--batch-labeled", "2", "--batch-unlabeled", "2", "--quiet", "--overlays", "1",
]  # fmt: skip


def _digests(folder) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(base, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch suponly run (its folder and checkpoint)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--out", str(out), *SMALL]) == 0
    return out


def test_train_refuses_an_out_that_holds_a_run_and_overwrite_clears_it_first(finished, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *SMALL, "--seed", "1"]) == 0
    before = _digests(out)
    assert {"last.pt", "best.pt", "metrics.csv", "data.json", "log.txt", "test_metrics.json"} <= set(before)
    capsys.readouterr()
    # A new run into it is refused before anything is written (it deleted metrics.csv at start).
    assert cli.main(["train", "--out", str(out), *SMALL, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: holds a run (last.pt, best.pt, metrics.csv" in err and "--resume" in err
    assert _digests(out) == before
    # An unfinished run (a signal saved last.pt in its first epoch) is a run too.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "last.pt").write_bytes(open(out / "last.pt", "rb").read())
    with pytest.raises(engine.UserError, match="holds a run"):
        Trainer(tiny(tmp_path, out=str(partial))).fit()
    assert (partial / "last.pt").read_bytes() == open(out / "last.pt", "rb").read()
    # --overwrite: the old run's files go first (no old overlay stays mixed in); others stay.
    (out / "overlays" / "stale.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", "--out", str(out), *SMALL, "--overlays", "0", "--overwrite"]) == 0
    assert not (out / "overlays").exists() and (out / "notes.txt").read_text() == "mine"
    assert open(out / "log.txt").read().count("data: synthetic") == 1
    # --resume continues a run in its own folder (nothing refused there).
    assert cli.main(["train", "--resume", str(out / "last.pt"), "--epochs", "2"]) == 0
    assert len(open(out / "metrics.csv").read().splitlines()) == 3  # header + 2 epochs
    # ... but resuming into another run's folder is refused as well.
    assert cli.main(["train", "--resume", str(out / "last.pt"), "--epochs", "3", "--out", str(finished)]) == 2
    assert f"--out {finished}: holds a run" in capsys.readouterr().err


def test_predict_writes_pred_files_beside_busi_masks_without_touching_them(finished, tmp_path, capsys):
    fake_busi(str(tmp_path / "BUSI"), per_class=3, lists=False)
    folder = tmp_path / "BUSI" / "benign"
    second = np.asarray(Image.open(folder / "benign (2)_mask.png"))
    Image.fromarray(second).save(folder / "benign (2)_mask_1.png")  # a second lesion's mask
    inputs = _digests(folder)
    ckpt = str(finished / "best.pt")
    # Into the images' own folder: refused (it holds the inputs) unless --overwrite.
    assert cli.main(["predict", str(folder), "--checkpoint", ckpt, "--out", str(folder)]) == 2
    assert "holds the input images" in capsys.readouterr().err and _digests(folder) == inputs
    assert cli.main(["predict", str(folder), "--checkpoint", ckpt, "--out", str(folder), "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "3 image(s) segmented" in text and "skipped 4 masks" in text  # 3 _mask + 1 _mask_1, not images
    after = _digests(folder)
    assert {k: after[k] for k in inputs} == inputs  # benign (1)_mask.png and the rest untouched
    assert sorted(set(after) - set(inputs)) == sorted(
        f"benign ({i}){s}.png" for i in (1, 2, 3) for s in ("_pred", "_overlay")
    )
    pred = np.asarray(Image.open(folder / "benign (1)_pred.png"))
    assert pred.shape == (40, 52) and set(np.unique(pred)) <= {0, 255}
    # Again with --overwrite: the earlier outputs are skipped as inputs, and replaced.
    assert cli.main(["predict", str(folder), "--checkpoint", ckpt, "--out", str(folder), "--overwrite"]) == 0
    assert "3 image(s) segmented" in capsys.readouterr().out and set(_digests(folder)) == set(after)
    # A fresh folder works; that folder with earlier predictions is refused; a single image too.
    fresh = tmp_path / "preds"
    assert cli.main(["predict", str(folder), "--checkpoint", ckpt, "--out", str(fresh)]) == 0
    assert cli.main(["predict", str(folder / "benign (1).png"), "--checkpoint", ckpt, "--out", str(fresh)]) == 2
    assert "holds earlier predictions (e.g. benign (1)_pred.png)" in capsys.readouterr().err
    assert data.is_mask_name("benign (1)_mask_12") and not data.is_mask_name("benign (1)_masked")


def test_predict_never_writes_through_a_link_onto_an_input(finished, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((40, 40), 60, np.uint8)).save(folder / "b.png")
    args = ["predict", str(folder / "a.png"), "--checkpoint", str(finished / "best.pt"), "--out", str(folder)]
    (folder / "a_pred.png").symlink_to(folder / "a.png")  # the output path leads to the input itself
    images = {"a.png": open(folder / "a.png", "rb").read(), "b.png": open(folder / "b.png", "rb").read()}
    assert cli.main([*args, "--overwrite"]) == 2
    assert "a_pred.png would replace an input image" in capsys.readouterr().err
    (folder / "a_pred.png").unlink()
    (folder / "a_pred.png").symlink_to(folder / "b.png")  # to another file: a link is never replaced
    assert cli.main([*args, "--overwrite"]) == 2
    assert "a_pred.png is a link or not a regular file" in capsys.readouterr().err
    assert {k: open(folder / k, "rb").read() for k in images} == images and (folder / "a_pred.png").is_symlink()


def test_eval_keeps_earlier_results_unless_overwrite(finished, capsys):
    args = ["eval", "--checkpoint", str(finished / "best.pt")]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "holds earlier results (test_per_image.csv, test_metrics.json, overlays)" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0
    assert cli.main([*args, "--out", str(finished)]) == 2  # the run's own test results
    assert "holds earlier results" in capsys.readouterr().err


def test_export_never_writes_over_the_checkpoint_a_link_a_device_or_the_runs_files(finished, tmp_path, capsys):
    ckpt = finished / "best.pt"
    before = _digests(finished)

    def refused(dst, *extra, needle):
        assert cli.main(["export", str(ckpt), str(dst), *extra]) == 2, dst
        err = capsys.readouterr().err
        assert needle in err and len(err.splitlines()) == 1, err
        assert _digests(finished) == before

    refused(ckpt, "--format", "state-dict", "--overwrite", needle="is the checkpoint being exported")
    refused(finished / "." / "best.pt", "--format", "state-dict", needle="is the checkpoint being exported")
    os.link(ckpt, tmp_path / "hard.pt")  # the same file under another name
    refused(tmp_path / "hard.pt", "--format", "state-dict", "--overwrite", needle="is the checkpoint being exported")
    assert cli.main(["export", str(tmp_path / "nowhere.pt"), str(tmp_path / "x.pt2")]) == 2
    assert "nowhere.pt: no such file" in capsys.readouterr().err
    # exporting to run/test_metrics.pt wrote its config over test_metrics.json
    refused(finished / "test_metrics.pt", "--format", "state-dict", "--overwrite", needle="is a file of the run")
    refused(finished / "last.pt", "--format", "state-dict", "--overwrite", needle="is a file of the run")
    refused(finished / "model.pt", needle="a torch.export program is written to a .pt2 file")
    target = tmp_path / "target.pt"
    target.write_bytes(b"keep")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    refused(link, "--format", "state-dict", "--overwrite", needle="is a symbolic link")
    assert target.read_bytes() == b"keep"
    refused("/dev/null", "--format", "state-dict", "--overwrite", needle="is not a regular file")
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"old")
    refused(existing, "--format", "state-dict", needle="exists; pass --overwrite")
    assert existing.read_bytes() == b"old"
    assert cli.main(["export", str(ckpt), str(existing), "--format", "state-dict", "--overwrite"]) == 0
    assert existing.read_bytes() != b"old" and (tmp_path / "model.json").is_file()
    assert _digests(finished) == before
