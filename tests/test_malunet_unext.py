"""MALUNet and UNeXt (SemiSeg-CAW's backbones): the published layouts and outputs, parameter counts,
shapes at odd sizes, gradients, state-dict round trips, the shifted MLP, SemiSeg-CAW on both, and a
tiny end-to-end training run of each through the training package.

tests/data/published_malunet_unext.pt holds the outputs of the public code (JCruan519/MALUNet,
jeya-maria-jose/UNeXt-pytorch at their default configs) on a seeded input with the state dict of
tests/published_layout.deterministic_state, computed once with that code (timm and mmcv stubbed; they
provide only init helpers there): our networks must give the same numbers with the same weights."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from published_layout import deterministic_state, malunet_layout, unext_layout
from train_helpers import tiny

from busseg_ops import models as M
from busseg_ops.models.unext import shift_groups
from busseg_ops.train import Trainer, engine, methods
from busseg_ops.train.errors import UserError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "published_malunet_unext.pt")
NETS = {"malunet": (M.MALUNet, malunet_layout), "unext": (M.UNeXt, unext_layout)}
H, W = 70, 45  # odd, and not multiples of 32


def count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", NETS)
def test_published_layout_keys_and_shapes(name):
    cls, layout = NETS[name]
    ours = [(k, tuple(v.shape)) for k, v in cls(1, 3).state_dict().items()]
    assert ours == layout()  # the public registration order, names and shapes: its checkpoints load


def test_parameter_counts_match_the_papers():
    # SemiSeg-CAW's backbone table: MALUNet 0.18 M, UNeXt 1.47 M (the public default configs)
    assert count(M.MALUNet(1, 3)) == 177_943 and abs(177_943 / 0.18e6 - 1) < 0.05
    assert count(M.UNeXt(1, 3)) == 1_471_921 and abs(1_471_921 / 1.47e6 - 1) < 0.05
    # the training package's softmax pair: one more output channel of the 1×1 classifier
    assert count(M.MALUNet(2, 3)) - count(M.MALUNet(1, 3)) == 8 + 1
    assert count(M.UNeXt(2, 3)) - count(M.UNeXt(1, 3)) == 16 + 1


@pytest.mark.parametrize("name,modes", [("malunet", ("eval",)), ("unext", ("eval", "train"))])
def test_outputs_equal_the_public_code(name, modes):
    cls, _ = NETS[name]
    reference = torch.load(DATA, weights_only=True)
    net = cls(1, 3)
    net.load_state_dict(deterministic_state(net.state_dict()))
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(7)) * 2 - 1  # as when it was made
    for mode in modes:
        getattr(net, mode)()
        with torch.no_grad():
            pred = net(x)["pred"]
        # MALUNet's public forward returns sigmoid(logits); the reference holds their logit
        torch.testing.assert_close(pred, reference[f"{name}_{mode}"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NETS)
def test_outputs_features_and_gradients_at_odd_sizes(name):
    cls, _ = NETS[name]
    torch.manual_seed(0)
    net = cls(2, in_channels=1, rep_dim=8, proj_dim=8).train()
    x = torch.randn(2, 1, H, W)
    out = net(x, need_rep=True, need_proj=True, need_feats=True)
    sizes = [(H, W)]
    for _ in range(5):  # max-pool 2 (floor) five times; UNeXt's stride-2 patch embeddings round up
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2) if name == "malunet" or len(sizes) <= 3 else (math.ceil(h / 2), math.ceil(w / 2)))
    assert out["pred"].shape == (2, 2, H, W)
    assert [tuple(f.shape) for f in out["feats"]] == [(2, c, *sizes[i]) for c, i in zip(net.channels, (2, 3, 4, 5))]
    assert out["proj"].shape == (2, 8, *sizes[5])
    rep_size = sizes[1] if name == "malunet" else sizes[0]  # the last decoder map: stride 2 / full size
    assert out["rep"].shape == (2, 8, *rep_size)
    assert net.strides == [4, 8, 16, 32]
    loss = sum((t * torch.randn_like(t)).sum() for v in out.values() for t in (v if isinstance(v, list) else [v]))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"


@pytest.mark.parametrize("name", NETS)
def test_state_dict_round_trip_and_gray_input(name):
    cls, _ = NETS[name]
    torch.manual_seed(0)
    a = cls(2, in_channels=3, gray_input=True).eval()
    torch.manual_seed(1)
    b = cls(2, in_channels=3, gray_input=True).eval()
    x = torch.rand(1, 1, 64, 48)  # gray: replicated to RGB and ImageNet-normalised inside
    assert not torch.equal(a(x)["pred"], b(x)["pred"])
    b.load_state_dict(a.state_dict())  # strict; the gray adapter has no state
    torch.testing.assert_close(a(x)["pred"], b(x)["pred"], rtol=0, atol=0)
    assert set(a.state_dict()) == {k for k, _ in NETS[name][1](cin=3, classes=2)}


def test_malunet_external_attention_memories_start_tied_but_are_separate():
    net = M.MALUNet(1, 3)
    ea = net.encoder4[0]
    torch.testing.assert_close(ea.linear_0.weight, ea.linear_1.weight.permute(1, 0, 2), rtol=0, atol=0)
    with torch.no_grad():
        ea.linear_1.weight.add_(1.0)  # the public code aliases the two: an update of one moves both
    assert not torch.allclose(ea.linear_0.weight, ea.linear_1.weight.permute(1, 0, 2))


def test_malunet_conv_split_attention_and_no_bridge():
    x = torch.randn(1, 3, 64, 64)
    conv = M.MALUNet(1, 3, split_att="conv")
    assert conv.scab.catt.att1.weight.shape == (8, 128, 1) and conv(x)["pred"].shape == (1, 1, 64, 64)
    plain = M.MALUNet(1, 3, bridge=False)
    assert not hasattr(plain, "scab") and plain(x)["pred"].shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="split_att"):
        M.MALUNet(split_att="mlp")
    with pytest.raises(ValueError, match="channels"):
        M.MALUNet(channels=(8, 16, 24, 32, 48, 66))


@pytest.mark.parametrize("dim", [2, 3])
def test_shift_groups_is_the_public_pad_roll_crop(dim):
    # The public shift: zero-pad by 2, chunk the channels into 5, roll group g by g - 2, crop back.
    x = torch.randn(2, 13, 9, 7)  # 13 channels: torch.chunk groups of 3, 3, 3, 3, 1
    p = F.pad(x, (2, 2, 2, 2))
    rolled = torch.cat([torch.roll(c, s, dim) for c, s in zip(torch.chunk(p, 5, 1), range(-2, 3))], 1)
    expected = rolled[:, :, 2:-2, 2:-2]
    torch.testing.assert_close(shift_groups(x, dim), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="5 groups"):
        shift_groups(torch.randn(1, 6, 4, 4), dim)  # torch.chunk makes 3 groups of 2


@pytest.mark.parametrize("arch", ["malunet", "unext"])
def test_semiseg_caw_on_the_papers_backbones(arch):
    net = M.SemiSegCAW(2, 2, arch=arch, in_channels=1, gray_input=False).train()
    first = net.main.seg.encoder1 if arch == "unext" else net.main.seg.encoder1[0]
    assert first.in_channels == 2  # the image and the ClassElevateSeg map
    assert net.main.fc.in_features == net.main.seg.channels[-1]  # the classifier on the bottleneck
    x = torch.randn(2, 1, 64, 64)
    out = net(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pred": (2, 2, 64, 64), "cls": (2, 2), "aux": (2, 1, 64, 64)}
    alone = M.SemiSegCAW(2, 2, arch=arch, in_channels=1, guide=False)
    assert alone.aux is None and set(alone(x)) == {"pred", "cls"}
    with pytest.raises(ValueError, match="guide=False"):
        alone.forward_aux(x)


def test_weight_generation_skips_an_absent_loss():
    wgm = M.WeightGenerationModule(3, init_log_var=0.5)
    total, _ = wgm([torch.tensor(2.0), torch.tensor(1.0), None])
    torch.testing.assert_close(total, torch.exp(torch.tensor(-0.5)) * 3 + 1.0)
    total.backward()
    assert wgm.log_vars.grad[2] == 0  # its s_i does not drift while it is absent
    with pytest.raises(ValueError, match="every task loss is None"):
        wgm([None, None, None])


# ------------------------------------------------------------------------- the training package
@pytest.mark.parametrize(
    "model,method,extra",
    [
        ("malunet", "semiseg_caw", {"stage1_epochs": 1}),  # ClassElevateSeg first, then the main network
        ("unext", "suponly", {}),
        ("unext", "rabusseg", {"crop": 64, "synthetic_size": 64, "num_proxies": 4}),  # a 2×2 relation grid
        ("malunet", "phnet", {"num_patches": 2}),
    ],
)
def test_tiny_training_runs_end_to_end(tmp_path, model, method, extra):
    small = dict(crop=32, synthetic_size=32, max_steps=1, overlays=1)
    cfg = tiny(tmp_path, model=model, method=method, **{**small, **extra})
    res = Trainer(cfg).fit()
    assert 0 <= res["dice"][0] <= 1
    net = engine.build_model(cfg)
    seg = net.main.seg if method == "semiseg_caw" else net
    assert isinstance(seg, {"malunet": M.MALUNet, "unext": M.UNeXt}[model])
    log = open(os.path.join(cfg.out, "metrics.csv")).read().splitlines()
    assert len(log) == 1 + cfg.epochs
    if method == "semiseg_caw":
        assert "loss_aux_seg" in log[0] and "loss_u" in log[0]
    # only the heads the method uses: suponly's network has exactly the public layout (2 classes)
    heads = {"suponly": set(), "rabusseg": {"proj"}, "phnet": {"rep"}}.get(method, set())
    built = {k for k in ("rep", "proj") if getattr(seg.heads, f"{k}_head") is not None}
    assert built == heads


def test_model_flag_combinations_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--model malunet: lanet builds its attention network on --backbone"):
        tiny(tmp_path, model="malunet", method="lanet").validate()
    with pytest.raises(UserError, match="--crop 16: --model unext pools five times"):
        tiny(tmp_path, model="unext", crop=16).validate()
    with pytest.raises(UserError, match="--synthetic-size 24: --model malunet"):
        tiny(tmp_path, model="malunet", synthetic_size=24).validate()
    with pytest.raises(UserError, match="--pretrained"):
        tiny(tmp_path, model="unext", pretrained="r.pth").validate()
    with pytest.raises(UserError, match="--labeled-share 1.5"):
        tiny(tmp_path, labeled_share=1.5).validate()


def test_labeled_share_draws_the_validation_images_first(tmp_path):
    from train_helpers import fake_busi

    from busseg_ops.train.data import make_splits

    lists = fake_busi(str(tmp_path / "busi"), per_class=12)  # 4 test, 10 + 10 training
    train = set(lists["labeled"]) | set(lists["unlabeled"])

    def split(share):
        s = make_splits("busi", str(tmp_path / "busi"), seed=3, val_count=4, labeled_share=share)
        return [{it.name for it in getattr(s, k)} for k in ("labeled", "unlabeled", "val", "test")]

    lab, unl, val, test = split(0.75)
    assert test == set(lists["test"]) and len(val) == 4 and val <= train
    assert (len(lab), len(unl)) == (12, 4) and lab | unl | val == train and not (lab | unl) & val
    full_lab, full_unl, full_val, _ = split(1.0)
    assert full_val == val and full_lab == lab | unl and not full_unl  # the same validation images
    assert split(0.75) == [lab, unl, val, test]  # seeded


@pytest.mark.parametrize("model", ["malunet", "unext"])
@pytest.mark.parametrize("crop", [64, 100, 250])
def test_relation_grid_is_the_deepest_map(tmp_path, model, crop):
    cfg = tiny(tmp_path, model=model, method="rabusseg", crop=crop)
    net = engine.build_model(cfg)
    assert tuple(net(torch.rand(1, 1, crop, crop), need_proj=True)["proj"].shape[-2:]) == methods.relation_grid(
        net, crop
    )


def test_code_form_hpc_takes_features_below_the_input_size():
    # MALUNet's projector runs at stride 2 (DeepLab's at 4): the labels and probabilities are brought
    # to the feature grid, as if the caller had resized them (nearest / bilinear).
    from busseg_ops.train.methods import patch_prototype_contrast

    g = torch.Generator().manual_seed(0)
    rep_u, rep_l = (F.normalize(torch.randn(2, 8, 16, 16, generator=g), dim=1) for _ in range(2))
    label_u, label_l = ((torch.rand(2, 32, 32, generator=g) > 0.5).long() for _ in range(2))
    prob_u, prob_l = (torch.softmax(torch.randn(2, 2, 32, 32, generator=g), 1) for _ in range(2))
    got, _ = patch_prototype_contrast(rep_u, label_u, prob_u, rep_l, label_l, prob_l, 4, 0.5)

    def nearest(y):
        return F.interpolate(y[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()

    def bilinear(p):
        return F.interpolate(p, size=(16, 16), mode="bilinear", align_corners=True)

    want, _ = patch_prototype_contrast(
        rep_u, nearest(label_u), bilinear(prob_u), rep_l, nearest(label_l), bilinear(prob_l), 4, 0.5
    )
    assert got > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
