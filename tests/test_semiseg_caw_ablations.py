"""SemiSeg-CAW's two ablations that swap a part for another paper's: IMTL (Liu et al., ICLR 2021)
instead of WGM (`--weighting imtl`) and LayerCAM (Jiang et al., TIP 2021) instead of
ClassElevateSeg's segmentation map (`--guide-map layercam`): their defining properties on toy
problems, the networks' shapes and graphs, tiny training runs, resume, and the one-line errors."""

import os

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny

from busseg_ops import models as M
from busseg_ops.train import Trainer, checkpoint, cli, methods
from busseg_ops.train.errors import UserError
from busseg_ops.train.export import export


# ------------------------------------------------------------------------------------------ IMTL-G
def _projections(g, alpha):
    d = alpha @ g
    return (g / g.norm(dim=1, keepdim=True)) @ d


@pytest.mark.parametrize("tasks,size", [(2, 5), (3, 7), (3, 200), (4, 33)])
def test_imtl_gradient_weights_give_equal_projections(tasks, size):
    torch.manual_seed(tasks * size)
    for _ in range(5):
        g = torch.randn(tasks, size, dtype=torch.float64) * torch.rand(tasks, 1, dtype=torch.float64) * 10
        alpha = M.imtl_gradient_weights(g)
        torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=torch.float64))
        proj = _projections(g, alpha)
        torch.testing.assert_close(proj, proj[:1].expand(tasks))
        # rescaling the tasks' losses leaves the combination's direction (its size follows from Σ α = 1)
        scale = torch.rand(tasks, 1, dtype=torch.float64) * 100 + 0.01
        other = M.imtl_gradient_weights(g * scale) @ (g * scale)
        torch.testing.assert_close(F.cosine_similarity(other, alpha @ g, dim=0), torch.tensor(1.0, dtype=torch.float64))


def test_imtl_gradient_weights_on_degenerate_gradients():
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(M.imtl_gradient_weights(g), torch.tensor([0.25, 0.75], dtype=torch.float64))
    # a flat task (zero gradient) has no direction: weight 0, the others balanced among themselves
    alpha = M.imtl_gradient_weights(torch.cat([g, torch.zeros(1, 2, dtype=torch.float64)]))
    torch.testing.assert_close(alpha, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    # equal gradients: D Uᵀ is singular; the combination is that gradient
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    alpha = M.imtl_gradient_weights(same)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(alpha @ same, same[0])
    torch.testing.assert_close(M.imtl_gradient_weights(torch.zeros(3, 4)).sum(), torch.tensor(1.0, dtype=torch.float64))


# -------------------------------------------------------------------------------------- IMTL module
class _ThreeTasks(torch.nn.Module):
    """A shared layer, one head per task, and a third head that only tasks 0 and 2 use."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 6)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(3))
        self.partial = torch.nn.Linear(6, 6)

    def losses(self, x):
        z = torch.tanh(self.shared(x))
        return [
            self.heads[0](self.partial(z)).pow(2).mean(),
            (self.heads[1](z) - 1).pow(2).mean() * 5,
            self.heads[2](torch.relu(self.partial(z))).abs().mean(),
        ]


def test_imtl_gives_the_shared_parameters_the_balanced_gradient_and_the_others_their_own():
    torch.manual_seed(0)
    net, imtl = _ThreeTasks().double(), M.IMTL(3).double()
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.3, -0.5, 1.0]))
    x = torch.randn(8, 4, dtype=torch.float64)
    losses = net.losses(x)
    total, scales, alpha = imtl(losses, list(net.parameters()))
    s = imtl.log_scales.detach()
    torch.testing.assert_close(total, sum(torch.exp(s[t]) * losses[t] - s[t] for t in range(3)))
    torch.testing.assert_close(scales, torch.exp(s))
    total.backward()

    # what IMTL prescribes, from each scaled loss's own gradients
    shared = list(net.shared.parameters())
    params, names = list(net.parameters()), [n for n, _ in net.named_parameters()]
    own = [
        torch.autograd.grad(torch.exp(s[t]) * l, params, allow_unused=True, retain_graph=True)
        for t, l in enumerate(net.losses(x))
    ]
    flat = torch.stack(
        [torch.cat([g[names.index(n)].flatten() for n in ("shared.weight", "shared.bias")]) for g in own]
    )
    torch.testing.assert_close(alpha, M.imtl_gradient_weights(flat).to(alpha.dtype))
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=alpha.dtype))
    got = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(got, alpha.double() @ flat)
    proj = _projections(flat, alpha.double())  # the combined gradient: equal projections on each task's
    torch.testing.assert_close(proj, proj[:1].expand(3))
    for n, p in net.named_parameters():  # a head (and the part two tasks share): the plain sum
        if not n.startswith("shared"):
            torch.testing.assert_close(p.grad, sum(g[names.index(n)] for g in own if g[names.index(n)] is not None))
    # IMTL-L: d/ds (e^s·L − s) = e^s·L − 1
    torch.testing.assert_close(imtl.log_scales.grad, torch.stack([torch.exp(s[t]) * losses[t] for t in range(3)]) - 1)


def test_imtl_loss_scales_settle_where_the_scaled_loss_is_one():
    imtl = M.IMTL(3)
    losses = [torch.tensor(4.0), torch.tensor(0.5), None]
    with torch.no_grad():
        imtl.log_scales.copy_(-torch.log(torch.tensor([4.0, 0.5, 1.0])))
    total, _, alpha = imtl(losses, [])
    total.backward()
    torch.testing.assert_close(imtl.log_scales.grad, torch.zeros(3), atol=1e-6, rtol=0)  # absent: no drift
    torch.testing.assert_close(alpha, torch.tensor([1.0, 1.0, 0.0]))  # nothing shared: nothing to balance
    opt, imtl = None, M.IMTL(2)
    opt = torch.optim.SGD(imtl.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        imtl([torch.tensor(4.0), torch.tensor(0.5)], [])[0].backward()
        opt.step()
    torch.testing.assert_close(imtl(losses[:2], [])[1], torch.tensor([1 / 4.0, 1 / 0.5]), rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="losses: every task loss is None"):
        imtl([None, None], [])
    with pytest.raises(ValueError, match="losses: expected 2"):
        imtl([torch.tensor(1.0)], [])


# ----------------------------------------------------------------------------------------- LayerCAM
def test_layercam_matches_a_hand_computation():
    """A = conv(x); y = fc(mean(ReLU(V·A))): ∂y_c/∂A_k(i, j) = Σ_j W_cj·[V_j·A(i, j) > 0]·V_jk / (h·w)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 5, 3, padding=1).double()
    v, w = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    a = conv(x)
    z = torch.einsum("jk,bkhw->bjhw", v, a)
    y = torch.relu(z).mean(dim=(2, 3)) @ w.T
    c = y.argmax(1)
    cam = M.layercam(a, y.gather(1, c[:, None])[:, 0])
    assert cam.shape == (2, 1, 7, 9) and not cam.requires_grad
    with torch.no_grad():
        grad = torch.einsum("bj,bjhw,jk->bkhw", w[c], (z > 0).double(), v) / (7 * 9)
        hand = torch.relu((torch.relu(grad) * a).sum(1, keepdim=True))
        low, high = hand.amin(dim=(2, 3), keepdim=True), hand.amax(dim=(2, 3), keepdim=True)
        hand = (hand - low) / (high - low)
    torch.testing.assert_close(cam, hand)
    f = torch.ones(1, 2, 3, 3, requires_grad=True)
    flat = M.layercam(f, (2 * f).sum(dim=(1, 2, 3)))
    assert torch.equal(flat, torch.zeros(1, 1, 3, 3))  # a constant map: 0, not 0/0
    resized = M.layercam(a, y.gather(1, c[:, None])[:, 0], (15, 4))  # resized, then normalised
    assert resized.shape == (2, 1, 15, 4) and torch.equal(resized.amax(dim=(2, 3)), torch.ones(2, 1))


@pytest.mark.parametrize(
    "arch,size,stride",
    [("unet", (70, 58), None), ("malunet", (67, 45), 16), ("unext", (64, 39), 16), ("deeplab", (35, 41), None)],
)
def test_class_elevate_seg_layercam_guide(arch, size, stride):
    torch.manual_seed(0)
    kw = {"unet": dict(base=4), "deeplab": dict(backbone="resnet18")}.get(arch, {})
    net = M.ClassElevateSeg(2, 2, arch=arch, in_channels=1, guide_map="layercam", rep_dim=0, proj_dim=0, **kw).eval()
    x = torch.rand(3, 1, *size)
    with torch.no_grad():  # as in evaluation: the map takes its gradient all the same
        out = net(x)
    assert out["aux"].shape == (3, 1, *size) and out["aux"].grad_fn is None
    assert out["aux"].min() >= 0 and torch.equal(out["aux"].amax(dim=(2, 3)), torch.ones(3, 1))  # min-max
    # by hand: the layer's input A, the predicted class's score, LayerCAM, resized, normalised
    seen = []
    hook = net.layercam_input().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ref = net(x.clone().requires_grad_(), need_guide=False, need_feats=True)
    hook.remove()
    a = seen[0]
    if stride:  # the paper's backbones: their stride-16 map (max pooling floors)
        assert list(a.shape[-2:]) == [n // stride for n in size]
    score = ref["cls"].gather(1, ref["cls"].argmax(1, keepdim=True))[:, 0]
    (grad,) = torch.autograd.grad(score.sum(), a)
    hand = F.interpolate(torch.relu((torch.relu(grad) * a).sum(1, keepdim=True)).detach(), size=size, mode="bilinear")
    low, high = hand.amin(dim=(2, 3), keepdim=True), hand.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out["aux"], (hand - low) / (high - low))
    torch.testing.assert_close(out["cls"], ref["cls"])
    with torch.no_grad():  # eval mode: an image's map is its own, whatever shares its batch
        torch.testing.assert_close(net(x[1:2])["aux"], out["aux"][1:2], atol=1e-5, rtol=1e-4)
    assert "aux" not in net(x, need_guide=False)
    assert (
        net.state_dict().keys()
        == M.ClassElevateSeg(2, 2, arch=arch, in_channels=1, rep_dim=0, proj_dim=0, **kw).state_dict().keys()
    )
    with pytest.raises(ValueError, match="guide_map"):
        M.ClassElevateSeg(arch=arch, guide_map="gradcam", **kw)


def test_layercam_guide_builds_no_graph_into_the_main_loss():
    torch.manual_seed(0)
    net = M.SemiSegCAW(2, 2, arch="unet", in_channels=1, base=4, rep_dim=0, proj_dim=0, guide_map="layercam").train()
    assert not net.aux.training  # frozen: eval mode, its BN statistics fixed
    x = torch.rand(2, 1, 40, 36)
    out = net(x)
    assert out["aux"].grad_fn is None and out["aux"].shape == (2, 1, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(net.aux(x)["aux"], out["aux"])
    (out["pred"].square().mean() + out["cls"].square().mean()).backward()
    assert all(p.grad is None for p in net.aux.parameters())
    assert all(p.grad is not None for p in net.main.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------- the training step
def _step(tmp_path, **kw):
    from test_train_methods import _loss

    return _loss(tiny(tmp_path, method="semiseg_caw", **kw))


def test_the_imtl_step_logs_its_weights_and_moves_the_shared_gradient(tmp_path):
    from test_train_methods import _batch, _setup

    grads = {}
    for weighting in ("wgm", "imtl"):
        cfg = tiny(tmp_path, method="semiseg_caw", weighting=weighting)
        student, teacher, method = _setup(cfg)
        student.train()
        torch.manual_seed(0)
        loss, logs = method(
            student,
            teacher,
            _batch(2, 1),
            _batch(2, 2, labeled=False),
            {"epoch": 1, "progress": 0.5, "warmup": False, "epochs": 2},
        )
        loss.backward()
        grads[weighting] = (student.main.seg.encoder.inc[0][0].weight.grad.clone(), student.main.fc.weight.grad.clone())
        if weighting == "imtl":
            assert {"alpha_seg", "alpha_cls", "alpha_u", "w_seg", "w_cls", "w_u"} <= set(logs)
            torch.testing.assert_close(logs["alpha_seg"] + logs["alpha_cls"] + logs["alpha_u"], torch.tensor(1.0))
            assert method.parameters()[-1] is method.imtl.log_scales and method.imtl.log_scales.grad is not None
    # the shared encoder's gradient is IMTL-G's combination; the classifier (cls alone) keeps its own
    assert not torch.allclose(grads["wgm"][0], grads["imtl"][0])
    torch.testing.assert_close(grads["wgm"][1], grads["imtl"][1])


def test_the_layercam_guide_changes_the_loss(tmp_path):
    base, _ = _step(tmp_path)
    other, _ = _step(tmp_path, guide_map="layercam")
    assert not torch.isclose(base, other, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("flags", [dict(weighting="imtl"), dict(guide_map="layercam")])
def test_tiny_training_runs_end_to_end_and_resume(tmp_path, flags):
    kw = dict(method="semiseg_caw", model="malunet", crop=32, synthetic_size=32, max_steps=1, overlays=1)
    cfg = tiny(tmp_path / "a", epochs=3, stage1_epochs=1, **kw, **flags)
    straight = Trainer(cfg)
    res = straight.fit()
    assert 0 <= res["dice"][0] <= 1
    header = open(os.path.join(cfg.out, "metrics.csv")).read().splitlines()[0]
    assert ("alpha_seg" in header) == ("weighting" in flags)
    st = checkpoint.load(os.path.join(cfg.out, "last.pt"))
    assert ("imtl" in st["method"]) == ("weighting" in flags)
    # stop after epoch 2, resume from last.pt: the same weights, IMTL's scales included
    cfg_b = tiny(tmp_path / "b", epochs=3, stage1_epochs=1, **kw, **flags)
    Trainer(cfg_b).fit(until=2, test=False)
    resumed = Trainer(cfg_b)
    resumed.resume(os.path.join(cfg_b.out, "last.pt"))
    assert resumed.epoch == 2
    resumed.fit()
    for a, b in ((straight.state_dict(), resumed.state_dict()),):
        for k in a["student"]:
            assert torch.equal(a["student"][k], b["student"][k]), k
        if "weighting" in flags:
            assert torch.equal(a["method"]["imtl"]["log_scales"], b["method"]["imtl"]["log_scales"])
            assert not torch.equal(a["method"]["imtl"]["log_scales"], torch.zeros(3))  # they trained


def test_layercam_checkpoint_exports_as_a_state_dict_not_a_program(tmp_path):
    cfg = tiny(tmp_path, method="semiseg_caw", guide_map="layercam", epochs=1, max_steps=1, overlays=0)
    Trainer(cfg).fit(test=False)
    src = os.path.join(cfg.out, "last.pt")
    with pytest.raises(UserError, match=r"^--format pt2: .*LayerCAM.*--format state-dict$"):
        export(src, str(tmp_path / "net.pt2"))
    export(src, str(tmp_path / "net.pt"), fmt="state-dict")
    assert os.path.isfile(tmp_path / "net.pt")


# ------------------------------------------------------------------------------- settings and errors
@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(wgm=False, weighting="imtl"), "--weighting imtl: the learned loss weights are off (--no-wgm)"),
        (dict(class_elevate=False, guide_map="layercam"), "--guide-map layercam: there is no ClassElevateSeg"),
        (dict(weighting="gradnorm"), "--weighting 'gradnorm': expected one of wgm, imtl"),
        (dict(guide_map="gradcam"), "--guide-map 'gradcam': expected one of segmentation, layercam"),
    ],
)
def test_conflicting_or_unknown_settings_are_one_line_errors(tmp_path, kw, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        tiny(tmp_path, method="semiseg_caw", **kw).validate()
    assert "\n" not in str(err.value)


def test_the_flags_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--weighting" in text and "--guide-map" in text and "--no-wgm" in text
    cfg = tiny(tmp_path, method="semiseg_caw")
    assert (cfg.semiseg_caw.weighting, cfg.semiseg_caw.guide_map, cfg.semiseg_caw.wgm) == ("wgm", "segmentation", True)
    assert isinstance(methods.build(cfg), methods.SemiSegCAW)
    assert cli.main(["train", "--method", "semiseg_caw", "--no-wgm", "--weighting", "imtl"]) == 2
    assert "--weighting imtl" in capsys.readouterr().err
