"""busseg_ops.models: shapes, gradients, op wiring, torch.compile, pretrained loading, sizes.

Small models throughout (ResNet-18 widths, U-Net base 8, 64-ish px inputs whose sides are not
multiples of 32); only the parameter-count test builds a ResNet-50."""

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import busseg_ops
from busseg_ops import models as M

H, W = 70, 58  # not divisible by 32 (nor by 8)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def shapes(out):
    return {k: (tuple(v.shape) if torch.is_tensor(v) else [tuple(f.shape) for f in v]) for k, v in out.items()}


def grad_check(model, loss):
    """Every trainable parameter gets a finite, non-zero gradient."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient reaches: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def random_loss(out):
    """A loss that touches every element of every output with a random weight."""
    total = 0
    for v in out.values():
        for t in [v] if torch.is_tensor(v) else v:
            total = total + (t * torch.randn_like(t)).sum()
    return total


# ---------------------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize(
    "dilate,strides",
    [
        ((False, True, True), [4, 8, 8, 8]),
        ((False, False, False), [4, 8, 16, 32]),
        ((False, False, True), [4, 8, 16, 16]),
    ],
)
def test_resnet18_stage_maps(dilate, strides):
    net = M.resnet18(replace_stride_with_dilation=dilate)
    feats = net(torch.randn(2, 3, H, W))
    assert net.strides == strides and net.channels == [64, 128, 256, 512]
    for f, c, s in zip(feats, net.channels, strides):
        assert f.shape == (2, c, math.ceil(H / s), math.ceil(W / s))
    assert net.conv1[0].stride == (2, 2) and [net.conv1[i].out_channels for i in (0, 3, 6)] == [64, 64, 128]
    assert net.layer1[0].conv1.in_channels == 128


def test_resnet_dilation_and_multi_grid():
    plain = M.resnet18()
    assert [b.conv2.dilation[0] for b in plain.layer3] == [1, 2]  # torchvision semantics
    assert [b.conv2.dilation[0] for b in plain.layer4] == [2, 4]
    grid = M.resnet50(multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in grid.layer4] == [4, 8, 16]  # DeepLabv3 multi-grid at OS 8
    assert grid.layer4[0].conv2.stride == (1, 1)
    with pytest.raises(ValueError, match="multi_grid"):
        M.resnet18(multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match="backbone"):
        M.resnet("resnet19")


def _bn(sd, name, c):
    sd.update({f"{name}.weight": torch.rand(c) + 0.5, f"{name}.bias": torch.randn(c)})
    sd.update({f"{name}.running_mean": torch.randn(c), f"{name}.running_var": torch.rand(c) + 0.5})
    sd[f"{name}.num_batches_tracked"] = torch.tensor(7)


def imagenet_resnet18(naming: str) -> dict:
    """A random ImageNet ResNet-18 state dict with the names and shapes of torchvision's resnet18
    (7×7 stem) or timm's resnet18d (deep stem 32-32-64, average-pool shortcuts: downsample.1/.2),
    written from those libraries' layouts, not from our module."""
    sd = {}
    if naming == "torchvision":
        sd["conv1.weight"] = torch.randn(64, 3, 7, 7)
        _bn(sd, "bn1", 64)
    else:
        sd["conv1.0.weight"] = torch.randn(32, 3, 3, 3)
        _bn(sd, "conv1.1", 32)
        sd["conv1.3.weight"] = torch.randn(32, 32, 3, 3)
        _bn(sd, "conv1.4", 32)
        sd["conv1.6.weight"] = torch.randn(64, 32, 3, 3)
        _bn(sd, "bn1", 64)
    ds = "downsample.0" if naming == "torchvision" else "downsample.1"
    ds_bn = "downsample.1" if naming == "torchvision" else "downsample.2"
    cin = 64
    for i, planes in enumerate((64, 128, 256, 512), 1):
        for b in range(2):
            p, inp = f"layer{i}.{b}.", cin if b == 0 else planes
            sd[p + "conv1.weight"] = torch.randn(planes, inp, 3, 3)
            _bn(sd, p + "bn1", planes)
            sd[p + "conv2.weight"] = torch.randn(planes, planes, 3, 3)
            _bn(sd, p + "bn2", planes)
            if b == 0 and inp != planes:
                sd[p + ds + ".weight"] = torch.randn(planes, inp, 1, 1)
                _bn(sd, p + ds_bn, planes)
        cin = planes
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


@pytest.mark.parametrize("naming,stem", [("torchvision", "plain"), ("timm", "timm-d")])
def test_pretrained_torchvision_and_timm_names_load_whole_with_a_summed_gray_stem(tmp_path, naming, stem):
    src = imagenet_resnet18(naming)
    path = tmp_path / f"{naming}.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.items()}}, path)  # a DataParallel checkpoint
    net = M.resnet18(in_channels=1, stem=stem)
    report = net.load_pretrained(str(path))
    stem_key = "conv1.weight" if naming == "torchvision" else "conv1.0.weight"
    own = net.state_dict()
    torch.testing.assert_close(own[stem_key], src[stem_key].sum(1, keepdim=True), rtol=0, atol=0)
    for k, v in src.items():
        if k != stem_key and not k.startswith("fc."):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    assert (
        report.missing == []
        and report.unexpected == []
        and sorted(report.ignored) == ["module.fc.bias", "module.fc.weight"]
    )
    assert len(report.loaded) == len(src) - 2 and "adapted from 3 to 1" in str(report)
    rgb = M.resnet18(in_channels=3, stem=stem)
    rgb.load_pretrained(str(path))
    torch.testing.assert_close(rgb.state_dict()[stem_key], src[stem_key], rtol=0, atol=0)


def test_pretrained_shape_mismatch_and_missing_file_are_errors(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(imagenet_resnet18("torchvision"), path)
    with pytest.raises(ValueError, match=r"tv.pth: shape mismatch: .* stem is plain .*--stem plain"):
        M.resnet18(in_channels=1, pretrained=str(path))  # the deep stem does not fit torchvision weights
    broken = imagenet_resnet18("torchvision")
    broken["layer3.1.conv2.weight"] = torch.randn(256, 256, 1, 1)
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"layer3\.1\.conv2\.weight is \(256, 256, 1, 1\) in the file"):
        M.resnet18(stem="plain", pretrained=str(path))
    assert str(M.resnet18(pretrained=None).load_report).startswith("no pretrained file")
    with pytest.raises(FileNotFoundError, match="no file"):
        M.resnet18(pretrained=str(tmp_path / "missing.pth"))
    assert torch.equal(M.adapt_input_conv(torch.ones(2, 3, 1, 1), 4), torch.full((2, 4, 1, 1), 0.75))


def test_resnet_upstream_flags_and_gray_input_adapter():
    assert [b.conv2.dilation[0] for b in M.resnet50(multi_grid=True).layer4] == [4, 8, 16]  # upstream multi_grid
    z = M.resnet18(zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for layer in (z.layer1, z.layer4) for b in layer)
    torch.manual_seed(0)
    gray = M.DeepLabV3Plus(2, "resnet18", in_channels=3, gray_input=True, rep_dim=0, proj_dim=0).eval()
    plain = M.DeepLabV3Plus(2, "resnet18", in_channels=3, rep_dim=0, proj_dim=0).eval()
    plain.load_state_dict(gray.state_dict())  # the adapter has no state: the same keys
    x = torch.rand(1, 1, 33, 41)
    rgb = (x.expand(-1, 3, -1, -1) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(gray(x)["pred"], plain(rgb)["pred"])


# ------------------------------------------------------------------------------ segmentation nets
def small_deeplab(**kw):
    return M.DeepLabV3Plus(2, "resnet18", rep_dim=32, proj_dim=32, **kw)


def test_deeplab_outputs_only_what_is_asked():
    net = small_deeplab().eval()
    x = torch.randn(2, 3, H, W)
    assert list(net(x)) == ["pred"] and net(x)["pred"].shape == (2, 2, H, W)
    out = net(x, need_rep=True, need_proj=True, need_feats=True, need_fp=True)
    s4, s8 = (math.ceil(H / 4), math.ceil(W / 4)), (math.ceil(H / 8), math.ceil(W / 8))
    assert shapes(out) == {
        "pred": (2, 2, H, W),
        "rep": (2, 32, *s4),
        "proj": (2, 32, *s8),
        "feats": [(2, 64, *s4), (2, 128, *s8), (2, 256, *s8), (2, 512, *s8)],
        "pred_fp": (2, 2, H, W),
    }
    torch.testing.assert_close(out["rep"].norm(dim=1), torch.ones(2, *s4))
    assert (out["proj"] >= 0).all()
    torch.testing.assert_close(out["pred"], net(x)["pred"])  # eval: fp branch = plain
    with pytest.raises(ValueError, match="rep_dim"):
        M.DeepLabV3Plus(2, "resnet18", rep_dim=0)(x, need_rep=True)


def test_deeplab_gradients_reach_every_parameter():
    net = small_deeplab().train()
    out = net(torch.randn(2, 3, H, W), need_rep=True, need_proj=True, need_fp=True)
    grad_check(net, random_loss(out))


@pytest.mark.parametrize("rep_stride", [1, 2, 4, 8])
def test_unet_outputs_and_gradients(rep_stride):
    net = M.UNet(2, in_channels=1, base=8, rep_dim=16, proj_dim=16, rep_stride=rep_stride)
    x = torch.randn(2, 1, H, W)
    out = net(x, need_rep=True, need_proj=True, need_feats=True)
    sizes = [(math.ceil(H / s), math.ceil(W / s)) for s in (2, 4, 8, 16)]
    assert shapes(out) == {
        "pred": (2, 2, H, W),
        "rep": (2, 16, math.ceil(H / rep_stride), math.ceil(W / rep_stride)),
        "proj": (2, 16, *sizes[-1]),
        "feats": [(2, 8 * 2**i, *sz) for i, sz in enumerate(sizes, 1)],
    }
    grad_check(net, random_loss(out))


@pytest.mark.parametrize("size", [(64, 48), (37, 45)])
def test_unet_projector_reads_the_decoder_map_at_its_stride(size):
    # PH-Net's projector at stride s is the same head on the decoder output s pixels per feature: upstream's
    # reads the DeepLab decoder at stride 4. The prediction does not depend on where the projector reads.
    x = torch.rand(2, 1, *size)
    nets = {}
    for stride in (1, 4):
        torch.manual_seed(0)
        nets[stride] = M.UNet(2, in_channels=1, base=4, rep_dim=8, proj_dim=0, rep_stride=stride).eval()
    seen = []
    nets[4].up[1].register_forward_hook(lambda m, args, out: seen.append(out))  # up blocks: strides 8, 4, 2, 1
    out4, out1 = nets[4](x, need_rep=True), nets[1](x, need_rep=True)
    torch.testing.assert_close(out4["rep"], nets[4].heads.rep_head(seen[0]), rtol=0, atol=0)
    assert seen[0].shape[-2:] == tuple(math.ceil(n / 4) for n in size)
    torch.testing.assert_close(out4["pred"], out1["pred"], rtol=0, atol=0)
    torch.testing.assert_close(out4["rep"].norm(dim=1), torch.ones_like(out4["rep"][:, 0]))


@pytest.mark.parametrize("bad", [0, 3, 16, -4])
def test_unet_rep_stride_must_be_a_decoder_level(bad):
    with pytest.raises(ValueError, match=rf"rep_stride must be one of \(8, 4, 2, 1\).*got {bad}"):
        M.UNet(2, rep_stride=bad)


@pytest.mark.parametrize("arch", ["unet", "deeplab"])
def test_upstream_dropout_perturbs_training_only_and_keeps_the_parameter_names(arch):
    # Without cutmix, dropout is upstream's only difference between the student's view and the
    # eval-mode EMA teacher's. Rates: U2PL/RA-BUSSeg's Dropout2d(0.1), on the U-Net's classifier path too.
    def build(dropout):
        torch.manual_seed(0)
        if arch == "unet":
            return M.UNet(2, in_channels=1, base=8, rep_dim=16, proj_dim=16, dropout=dropout, encoder_dropout=dropout)
        return small_deeplab(in_channels=1, dropout=dropout)

    with_dropout, without = build(True), build(False)
    without.load_state_dict(with_dropout.state_dict())  # strict: the same parameter names
    rates = [
        (type(m).__name__, m.p) for m in with_dropout.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)
    ]
    if arch == "unet":
        # the SSL4MIS encoder (encoder_dropout), the classifier path, the projector, the relation head
        assert rates == [("Dropout", p) for p in (0.05, 0.1, 0.2, 0.3, 0.5)] + [("Dropout2d", 0.1)] * 3
    else:  # ASPP output, the two classifier blocks, the projector, the relation head
        assert rates == [("Dropout2d", 0.1)] * 5
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in without.modules())
    x, heads = torch.rand(2, 1, 37, 45), dict(need_rep=True, need_proj=True)
    for net in (with_dropout, without):
        net.eval()
    a, b = with_dropout(x, **heads), without(x, **heads)
    for key in ("pred", "rep", "proj"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # eval: dropout is the identity
    for net in (with_dropout, without):
        net.train()
    first, second = with_dropout(x, **heads), with_dropout(x, **heads)
    for key in ("pred", "rep", "proj"):
        assert (first[key] - second[key]).abs().max() > 1e-3, key  # a new mask each forward
    first, second = without(x, **heads), without(x, **heads)
    torch.testing.assert_close(first["pred"], second["pred"], rtol=0, atol=0)


def test_unet_default_dropout_is_upstreams_classifier_path_only():
    # Upstream (U2PL/RA-BUSSeg/PH-Net decoder.py) keeps Dropout2d(0.1) right before the final 1x1 classifier;
    # the SSL4MIS encoder dropout is opt-in. With only the heads' dropout the classifier path would be
    # deterministic, and the student would see exactly the teacher's view without cutmix.
    net = M.UNet(2, in_channels=1, base=4, rep_dim=0, proj_dim=0)
    drops = [m for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert [(type(m).__name__, m.p) for m in drops] == [("Dropout2d", 0.1)]
    assert net.classifier_dropout is drops[0]
    seen = []
    net.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    net.train()
    net(torch.rand(2, 1, 32, 32))
    channels_zeroed = (seen[0].abs().sum((2, 3)) == 0).float().mean()
    assert channels_zeroed > 0.02  # whole channels dropped before the classifier (p = 0.1 of 2·4)


def test_resnet50_deeplab_parameter_count():
    net = M.DeepLabV3Plus(2, "resnet50")

    def count(m):
        return sum(p.numel() for p in m.parameters())

    total, backbone, heads = count(net), count(net.backbone), count(net.heads)
    print(
        f"\nResNet-50 DeepLabv3+ (deep stem, K=2): backbone {backbone / 1e6:.2f} M, segmentation net "
        f"{(total - heads) / 1e6:.2f} M (published ≈40.5 M), + rep/proj heads {heads / 1e6:.2f} M = "
        f"{total / 1e6:.2f} M"
    )
    assert 23.4e6 < backbone < 23.9e6  # torchvision R50 trunk 23.5 M + deep stem
    assert 40.0e6 < total - heads < 41.0e6
    # rep: 3×3 conv + BN, then a plain 1×1 conv with bias; proj: 3×3 conv + BN
    rep, proj = 304 * 256 * 9 + 2 * 256 + 256 * 256 + 256, 2048 * 256 * 9 + 2 * 256
    assert heads == rep + proj


# ------------------------------------------------------------------------------- relation modules
def test_arp_module_matches_the_op_by_hand():
    feat = torch.randn(2, 16, 9, 8, requires_grad=True)
    logits = torch.randn(2, 2, H, W, requires_grad=True)
    arp = M.AdjacentRelationPropagation(kernel_size=3, dilation=2)
    out = arp(feat, logits)
    ref = up(busseg_ops.adjacent_relation_propagation(feat, up(logits.detach(), (9, 8)), 3, 2), (H, W))
    torch.testing.assert_close(out, ref)
    target = torch.randint(0, 2, (2, H, W))
    target[:, :3] = 255
    loss = arp.loss(feat, logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(ref, target, ignore_index=255))
    loss.backward()
    assert feat.grad.abs().sum() > 0 and logits.grad is None  # logits are detached


def cra_by_hand(feats, proj, label, num_proxies, scales, seed):
    """The CRA wiring (docs/ops.md) written out, calling the ops directly."""
    lab = F.interpolate(label[:, None].float(), size=proj.shape[-2:], mode="nearest")[:, 0].long()
    lab[lab == 255] = 0
    idx = busseg_ops.greedy_proxy_sampling(
        proj.detach(), num_proxies, label=lab, generator=torch.Generator().manual_seed(seed)
    )
    feats = feats[-scales:]
    deep = feats[-1].shape[-2:]
    proxies = [
        busseg_ops.gather_proxies(f, busseg_ops.map_proxy_indices(idx, tuple(proj.shape[-2:]), tuple(f.shape[-2:])))
        for f in feats
    ]
    aligned = [up(f.detach(), deep) for f in feats[:-1]] + [feats[-1]]
    return busseg_ops.cross_layer_alignment_loss(aligned, proxies), idx, lab


def check_cra_module(scales):
    net = small_deeplab().train()
    x = torch.randn(2, 3, H, W)
    label = torch.zeros(2, H, W, dtype=torch.long)
    label[0, 20:50, 10:40] = 1
    label[1, :, :5] = 255  # ignore pixels never seed the first proxy
    out = net(x, need_proj=True, need_feats=True)
    cra = M.CrossLayerRelationAlignment(num_proxies=12, scales=scales)
    loss = cra(out["feats"], out["proj"], label, generator=torch.Generator().manual_seed(7))
    ref, idx, lab = cra_by_hand(out["feats"], out["proj"], label, 12, scales, 7)
    torch.testing.assert_close(loss, ref)
    assert loss > 0
    assert lab[0].flatten()[idx[0, 0]] == 1  # first proxy on the lesion
    assert idx.shape == (2, 12) and all(len(set(r.tolist())) == 12 for r in idx)
    net.zero_grad()
    loss.backward()
    stages = ["layer1", "layer2", "layer3", "layer4"][4 - scales :]
    for name in stages:  # via the proxies
        assert getattr(net.backbone, name)[0].conv1.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scales", [2, 3, 4])
def test_cra_module_matches_ops_by_hand(scales):
    check_cra_module(scales)


def test_cra_module_validates():
    with pytest.raises(ValueError, match="scales"):
        M.CrossLayerRelationAlignment(scales=5)
    with pytest.raises(ValueError, match="feats"):
        M.CrossLayerRelationAlignment(scales=4)([torch.randn(1, 4, 4, 4)] * 3, torch.randn(1, 4, 4, 4))


# ----------------------------------------------------------------------------------- torch.compile
def test_torch_compile_full_forward_with_arp():
    torch._dynamo.reset()
    net = small_deeplab().eval()
    arp = M.AdjacentRelationPropagation()

    def step(x):
        out = net(x, need_proj=True)
        return out["pred"], arp(out["proj"], out["pred"])

    x = torch.randn(2, 3, 66, 62)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for got, want in zip(compiled(x), step(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ LA-Net
@pytest.mark.parametrize("backbone", ["resnet18", "unet"])
def test_lanet_outputs_and_gradients(backbone):
    net = M.LANet(3, backbone, in_channels=1, **({"unet_base": 8} if backbone == "unet" else {})).train()
    out = net(torch.randn(2, 1, H, W), need_feats=True)
    assert out["mask_logits"].shape == (2, 1, H, W) and out["cls"].shape == (2, 3)
    assert ((out["mask"] > 0) & (out["mask"] < 1)).all()
    torch.testing.assert_close(out["mask"], torch.sigmoid(out["mask_logits"]))
    assert len(out["feats"]) == 4
    del out["feats"]
    grad_check(net, random_loss(out))


def test_lanet_mask_attention_classifier():
    """cls = FC(GAP(f + f·mask)): with the fusion forced to a constant mask m the pooled feature
    is (1 + m)·GAP(f)."""
    net = M.LANet(2, "resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    f = net.backbone(x)[-1].mean(dim=(2, 3))
    for m in (0.0, 3.0):
        with torch.no_grad():
            net.lanet.fuse[0].weight.zero_()
            net.lanet.fuse[1].bias.fill_(m)
            net.lanet.fuse[1].running_mean.zero_()
            net.lanet.fuse[1].running_var.fill_(1 - 1e-5)
            torch.testing.assert_close(net(x)["cls"], net.fc((1 + torch.sigmoid(torch.tensor(m))) * f))


# ------------------------------------------------------------------------------------- SemiSeg-CAW
def test_semiseg_caw_guidance_and_gradients():
    net = M.SemiSegCAW(2, 3, arch="unet", in_channels=1, base=8, rep_dim=0, proj_dim=0).train()
    assert not net.aux.training and net.main.seg.encoder.inc[0][0].in_channels == 2
    x = torch.randn(2, 1, H, W)
    out = net(x)
    assert shapes(out) == {"pred": (2, 2, H, W), "cls": (2, 3), "aux": (2, 1, H, W)}
    torch.testing.assert_close(out["aux"], 1 - torch.softmax(net.aux(x)["pred"], 1)[:, :1])
    loss = random_loss(out)
    loss.backward()
    assert all(p.grad is None for p in net.aux.parameters())  # frozen stage-1 network
    grad_check(net.main, random_loss(net(x)))

    joint = M.SemiSegCAW(2, 3, arch="deeplab", backbone="resnet18", rep_dim=0, proj_dim=0, freeze_aux=False)
    out = joint(torch.randn(2, 3, H, W))
    assert set(out) == {"pred", "cls", "aux", "aux_pred", "aux_cls"}
    grad_check(joint, random_loss(out))


def test_class_elevate_seg_outputs():
    net = M.ClassElevateSeg(2, 2, arch="deeplab", backbone="resnet18", rep_dim=8, proj_dim=0)
    out = net(torch.randn(2, 3, H, W), need_rep=True, need_feats=True)
    assert set(out) == {"pred", "cls", "aux", "rep", "feats"} and out["aux"].shape == (2, 1, H, W)
    with pytest.raises(ValueError, match="arch"):
        M.SegClassNet(arch="vit")


def test_weight_generation_module():
    wgm = M.WeightGenerationModule(2)
    losses = [torch.tensor(4.0), torch.tensor(0.5)]
    total, w = wgm(losses)
    torch.testing.assert_close(total, torch.tensor(4.5))
    torch.testing.assert_close(w, torch.ones(2))
    opt = torch.optim.SGD(wgm.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        wgm(losses)[0].backward()
        opt.step()
    _, w = wgm(losses)
    assert (w > 0).all()
    torch.testing.assert_close(w, torch.tensor([1 / 4.0, 1 / 0.5]), rtol=1e-2, atol=1e-3)  # optimum exp(s)=L
    with pytest.raises(ValueError, match="losses"):
        wgm([torch.tensor(1.0)])


def test_docs_models_example_runs():
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "models.md")).read()
    section = page[page.index("## Example") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(code, scope)  # the snippet as a reader would paste it
    assert scope["out"]["pred"].shape == (2, 2, 96, 96) and torch.isfinite(scope["l_arp"] + scope["l_cra"])


def test_projector_features_are_not_confined_to_the_positive_orthant():
    # A ReLU at the output (as before) makes every feature non-negative: no two features are more
    # than 90° apart and the contrastive loss cannot push the classes apart. Upstream's head ends
    # in a plain 1×1 conv.
    torch.manual_seed(0)
    proj = M.Projector(8, dim=16, hidden=32).train()
    z = proj(torch.randn(2, 8, 9, 11)).permute(0, 2, 3, 1).reshape(-1, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(z)))
    assert (z < 0).any() and (z @ z.T).min() < -0.2
