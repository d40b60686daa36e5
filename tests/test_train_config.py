"""Paper-faithful training: the upstream nested config and the presets, OHEM, the drop-percent
schedule and the EMA ramp, each against upstream's semantics written out by hand."""

import json
import math

import pytest
import torch
from train_helpers import fake_busi, tiny, write_lists

from busseg_ops import models
from busseg_ops.train import Trainer, checkpoint, cli, config, engine, methods
from busseg_ops.train.errors import UserError

# The structure of the public RA-BUSSeg experiments/busi/1_2/config.yaml (a copy written here, keys
# and values as upstream has them; nothing is fetched).
UPSTREAM_YAML = """\
dataset:
  type: bus_semi
  train:
    data_root: data/BUS/Breast-BUSI/
    data_list: data/BUSI/1_2/labeled.txt
    flip: True
    GaussianBlur: False
    rand_resize: [0.5, 2.0]
    crop:
      type: rand
      size: [512, 512]
    batch_size: 2
  val:
    data_root: data/BUS/Breast-BUSI/
    data_list: data/BUSI/test.txt
    batch_size: 1
  n_total: 518
  n_sup: 259
  noise_std: 0.1
  workers: 2
  mean: [123.675, 116.28, 103.53]
  std: [58.395, 57.12, 57.375]
  ignore_label: 255
trainer:
  epochs: 200
  eval_on: True
  sup_only_epoch: 10
  optimizer:
    type: SGD
    kwargs:
      lr: 0.003
      momentum: 0.9
      weight_decay: 0.0005
  lr_scheduler:
    mode: poly
    kwargs:
      power: 0.9
  unsupervised:
    TTA: False
    drop_percent: 80
    apply_aug: False
saver:
  snapshot_dir: experiments/busi/1_2/1_fold/checkpoint/
  log_dir: experiments/busi/1_2/1_fold/
  pretrain: ''
criterion:
  type: ohem
  kwargs:
    use_weight: False
net:
  num_classes: 2
  sync_bn: True
  ema_decay: 0.99
  encoder:
    type: rabusseg.models.resnet.resnet50
    kwargs:
      multi_grid: True
      zero_init_residual: True
      fpn: True
      replace_stride_with_dilation: [False, True, True]
  decoder:
    type: rabusseg.models.decoder.dec_deeplabv3_plus
    kwargs:
      inner_planes: 256
      dilations: [12, 24, 36]
"""

SIZES = [
    "--crop", "64", "--backbone", "resnet18", "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "0",
    "--proj-dim", "16", "--rep-dim", "16", "--num-proxies", "8", "--quiet",
]  # fmt: skip


def test_upstream_nested_config_maps_and_trains(tmp_path, capsys, monkeypatch):
    # RA-BUSSeg's layout beside the config: data/BUS/Breast-BUSI (image/ + label/), data/BUSI lists.
    split = fake_busi(str(tmp_path / "data" / "BUS" / "Breast-BUSI"), per_class=6, lists=False, upstream=True)
    write_lists(str(tmp_path / "data" / "BUSI"), split)
    path = tmp_path / "config.yaml"
    path.write_text(UPSTREAM_YAML)
    mapped = config.load_file(str(path))
    assert mapped["method"] == "rabusseg" and mapped["data"] == "busi" and mapped["partition"] == "1/2"
    # relative paths in a config file are read from its folder, wherever the command runs
    assert mapped["split_dir"] == str(tmp_path / "data" / "BUSI")
    assert mapped["root"] == str(tmp_path / "data" / "BUS" / "Breast-BUSI")
    assert mapped["out"] == str(tmp_path / "experiments" / "busi" / "1_2" / "1_fold" / "checkpoint")
    assert (mapped["crop"], mapped["batch_labeled"], mapped["batch_unlabeled"], mapped["in_channels"]) == (512, 2, 2, 3)
    assert (mapped["criterion"], mapped["drop_percent"], mapped["warmup_epochs"], mapped["ema"]) == (
        "ohem",
        80,
        10,
        0.99,
    )
    assert mapped["multi_grid"] and mapped["zero_init_residual"] and mapped["cutmix_p"] == 0.0
    # The shipped preset is this file's protocol (data and output paths are flags there).
    preset = config.load_file(config.preset_path("rabusseg_busi_1_2"))
    for key, value in mapped.items():
        if key not in ("root", "split_dir", "out", "num_workers"):
            assert preset[key] == value, key
    # A few steps on the data the file names, run from another folder (the flags override sizes).
    monkeypatch.chdir(tmp_path / "data")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), *SIZES, "--out", str(out)]) == 0
    st = checkpoint.load(str(out / "last.pt"))
    assert st["global_step"] == 2 and st["config"]["method"] == "rabusseg" and st["config"]["in_channels"] == 3
    assert st["config"]["criterion"] == "ohem" and st["config"]["weight_decay"] == 0.0005
    text = capsys.readouterr().out
    assert "test Dice" in text and f"split lists in {tmp_path / 'data' / 'BUSI'}" in text
    assert json.load(open(out / "data.json"))["sizes"] == {"labeled": 5, "unlabeled": 5, "val": 2, "test": 2}
    # The same file elsewhere: its lists are missing there, which is an error naming the path tried
    # (not a random split of the images).
    moved = tmp_path / "elsewhere" / "config.yaml"
    moved.parent.mkdir()
    moved.write_text(UPSTREAM_YAML.replace("data_root: data/BUS", f"data_root: {tmp_path}/data/BUS"))
    assert cli.main(["train", "--config", str(moved), *SIZES, "--out", str(tmp_path / "run2")]) == 2
    assert f"--split-dir {tmp_path / 'elsewhere' / 'data' / 'BUSI'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "last.pt").exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            ("  ema_decay: 0.99", "  ema_decay: 0.99\n  aux_loss:\n    loss_weight: 0.4"),
            "net.aux_loss.loss_weight has no",
        ),
        (("dilations: [12, 24, 36]", "dilations: [6, 12, 18]"), r"net.decoder.kwargs.dilations: \[6, 12, 18\]"),
        (("type: bus_semi", "type: pascal_semi"), "dataset.type: 'pascal_semi'"),
        (("data_list: data/BUSI/test.txt", "data_list: data/BUSI/val.txt"), "dataset.val.data_list"),
        (("pretrain: ''", "pretrain: ckpt.pth"), "saver.pretrain"),
    ],
)
def test_upstream_keys_without_a_meaning_here_are_named(tmp_path, edit, message):
    path = tmp_path / "config.yaml"
    path.write_text(UPSTREAM_YAML.replace(*edit))
    with pytest.raises(UserError, match=message):
        config.load_file(str(path))


def test_flat_config_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: ten\n")
    with pytest.raises(UserError, match="bad.yaml: epochs: expected int, got 'ten'"):
        config.load_file(str(bad))
    bad.write_text("size: 64\n")
    with pytest.raises(UserError, match=r"unknown config keys: size"):
        config.load_file(str(bad))
    with pytest.raises(UserError, match=r"unknown config keys: size \(now crop\)"):
        config.TrainConfig.from_dict({"size": 64})
    bad.write_text("epochs: [1\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        config.load_file(str(bad))


@pytest.mark.parametrize("name", config.presets())
def test_each_preset_parses_and_builds_its_model(tmp_path, name):
    path = config.preset_path(name)
    text = open(path).read()
    assert "# Reported:" in text and ("Dice" in text) and "root" not in config.load_file(path)
    cfg = config.TrainConfig.from_dict({**config.load_file(path), "root": str(tmp_path)})
    assert name.startswith(cfg.method) and cfg.data in name
    model = engine.build_model(cfg)
    nets = engine.resnets(model)
    if cfg.model == "deeplab" or isinstance(model, models.LANet):
        assert nets and all(n.stem == cfg.stem for n in nets) and nets[0].in_channels == cfg.in_channels
    methods.get(cfg.method).check_network(cfg, model)  # the checks a run makes before its first step
    assert sum(p.numel() for p in model.parameters()) > (1.7e5 if cfg.model == "malunet" else 1e6)  # MALUNet 0.18 M


def _probs_logits(p_true, target):
    """Logits whose softmax gives each pixel's true class exactly the probability p_true."""
    p = torch.tensor(p_true, dtype=torch.float64).view(1, 2, 3)
    t = torch.tensor(target).view(1, 2, 3)
    other = torch.log1p(-p.clamp(max=1 - 1e-12))
    logit_true = torch.log(p)
    lo = torch.where(t == 1, other, logit_true)
    hi = torch.where(t == 1, logit_true, other)
    return torch.stack([lo, hi], 1), t


def test_ohem_equals_a_hand_computed_example():
    # Six pixels; true-class probabilities 0.9, 0.6, 0.2, 0.8, 0.75 and one ignored pixel.
    logits, target = _probs_logits([0.9, 0.6, 0.2, 0.8, 0.75, 0.5], [0, 1, 0, 1, 0, 255])
    # min_kept 3: the 3rd smallest probability (0.75) is above thresh 0.7, so the threshold rises
    # to 0.75: kept 0.6, 0.2, 0.75.
    keep = methods.ohem_keep(logits, target, 0.7, 3)
    assert keep.view(-1).tolist() == [False, True, True, False, True, False]
    expected = -(math.log(0.6) + math.log(0.2) + math.log(0.75)) / 3
    assert math.isclose(float(methods.ohem_ce(logits, target, 0.7, 3)), expected, rel_tol=1e-9)
    # min_kept 1: the smallest (0.2) is below 0.7: threshold 0.7, kept 0.6 and 0.2.
    expected = -(math.log(0.6) + math.log(0.2)) / 2
    assert math.isclose(float(methods.ohem_ce(logits, target, 0.7, 1)), expected, rel_tol=1e-9)
    # More wanted than valid pixels (6 > 5), or min_kept 0 (upstream skips the selection): all valid.
    expected = -sum(math.log(p) for p in (0.9, 0.6, 0.2, 0.8, 0.75)) / 5
    for min_kept in (6, 0):
        assert math.isclose(float(methods.ohem_ce(logits, target, 0.7, min_kept)), expected, rel_tol=1e-9)


def test_drop_percent_follows_upstreams_schedule_at_three_epochs(tmp_path, monkeypatch):
    # U2PL: percent_unreliable = (100 − drop_percent)·(1 − epoch/epochs) with drop_percent 80.
    for epoch, expected in ((0, 20.0), (10, 19.0), (150, 5.0)):
        assert math.isclose(methods.unreliable_percent(80, epoch, 200), expected)
    seen = []

    def stub(logits, target, prob, drop):
        seen.append(drop)
        return logits.sum() * 0 + 1.0

    import busseg_ops

    monkeypatch.setattr(busseg_ops, "entropy_filtered_cross_entropy", stub)
    cfg = tiny(tmp_path, method="rabusseg", arp=False, cra=False, drop_percent=80.0, epochs=200)
    method, net = methods.build(cfg), engine.build_model(cfg)
    from test_train_methods import _batch

    for epoch in (0, 10, 150):
        _, logs = method(net, net, _batch(2, 1), _batch(2, 2, labeled=False), {"epoch": epoch, "epochs": 200})
        valid = 2 * 64 * 64  # no padding in these batches
        kept = valid - int(seen[-1] / 100 * valid)
        assert math.isclose(float(logs["loss_u"]), valid / kept, rel_tol=1e-6)  # U2PL's all/kept weighting
    assert seen == [20.0, 19.0, 5.0]


def test_ema_ramp_starts_after_the_supervised_only_epochs(tmp_path):
    cfg = tiny(tmp_path, method="suponly", warmup_epochs=1, epochs=2, max_steps=2, ema=0.99)
    tr = Trainer(cfg)

    def params(m):
        return [p.detach().clone() for p in m.parameters()]

    batches = tr._batches(0)
    for _ in range(tr.steps_per_epoch):  # the supervised-only epoch: the teacher is the student
        tr.train_step(*next(batches), {"epoch": 0, "warmup": True, "progress": 0.0, "epochs": 2})
        assert all(torch.equal(a, b) for a, b in zip(params(tr.teacher), params(tr.student)))
    tr.epoch, ctx = 1, {"epoch": 1, "warmup": False, "progress": 0.5, "epochs": 2}
    batches = tr._batches(1)
    tr.train_step(*next(batches), ctx)  # first semi-supervised step: t = 0, decay 0
    assert all(torch.equal(a, b) for a, b in zip(params(tr.teacher), params(tr.student)))
    before = params(tr.teacher)
    tr.train_step(*next(batches), ctx)  # t = 1: decay min(0.99, 1 − 1/2) = 0.5
    for t, t0, s in zip(params(tr.teacher), before, params(tr.student)):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)


def test_a_key_given_twice_is_an_error_naming_it_and_flat_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("method: rabusseg\nepochs: 3\nlr: 0.01\nepochs: 5\n")
    with pytest.raises(UserError, match=r"twice.yaml: line 4: key 'epochs' is given twice \(first on line 2\)"):
        config.load_file(str(path))
    path.write_text("dataset:\n  train:\n    flip: True\n    flip: False\n")  # inside a section too
    with pytest.raises(UserError, match="line 4: key 'flip' is given twice"):
        config.load_file(str(path))
    path.write_text("base: &b {epochs: 3}\nother:\n  <<: *b\n  epochs: 4\n")  # a merge key overrides on purpose
    with pytest.raises(UserError, match="unknown config keys: base, other"):
        config.load_file(str(path))
    js = tmp_path / "twice.json"
    js.write_text('{"epochs": 3, "epochs": 5}')
    with pytest.raises(UserError, match="twice.json: key 'epochs' is given twice"):
        config.load_file(str(js))
    sub = tmp_path / "configs"
    sub.mkdir()
    flat = sub / "run.yaml"
    flat.write_text("data: busi\nroot: ../data/BUSI\nsplit_dir: /abs/lists\nout: runs/x\npretrained: ~/w.pth\n")
    values = config.load_file(str(flat))
    assert values["root"] == str(tmp_path / "data" / "BUSI") and values["split_dir"] == "/abs/lists"
    assert values["out"] == str(sub / "runs" / "x") and values["pretrained"] == "~/w.pth"


def test_values_that_failed_mid_training_are_refused_by_the_config():
    for name, value, message in (
        ("lr", float("inf"), "--lr inf: must be a finite number"),
        ("weight_decay", float("inf"), "--weight-decay inf: must be a finite number"),
        ("lambda_u", float("nan"), "--lambda-u nan: must be a finite number"),
        ("temperature", float("nan"), "--temperature nan: must be a finite number"),
        ("synthetic_n", 10**12, "--synthetic-n 1000000000000: must be at most 100000"),
        ("arp_kernel", 32769, "--arp-kernel 32769: must be at most 32767"),
        ("unet_base", 10**5, "--unet-base 100000: must be at most 128"),
        ("proj_dim", 10**6, "--proj-dim 1000000: must be at most 2048"),
        ("bank_size", 10**9, "--bank-size 1000000000: must be at most 65536"),
        ("scale_max", 1e6, r"--scale-max 1000000.0: must be at most 4.0"),
        ("seed", -1, "--seed -1: must be at least 0"),
    ):
        with pytest.raises(UserError, match=message):
            config.TrainConfig(**{name: value}).validate()
