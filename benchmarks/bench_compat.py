"""busseg_ops.compat against the papers' code at the upstream settings (issues 15, 29), with two
baselines: ``upstream_published``, the published files (loaded by tests/support/published.py from
``BUSSEG_UPSTREAM_DIR``; skipped when it is not set), and ``upstream_restated``, our restatement
tests/support/upstream.py (always available). The problems and their sizes: docs/benchmarks.md.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from support import published, upstream
from support.memory import peak_extra_mib

from busseg_ops.compat import phnet, rabusseg

B, H, W, M = 8, 65, 65, 64
CHANNELS = (256, 512, 1024, 2048)
PROJ = 256
CROP = 513
PB, PS, PN = 8, 512, 16  # PH-Net: images, input size, patches per side
FEAT, D = 128, 256


def lesions(b, size, seed):
    """(b, size, size) int64: one ellipse of 1 per image."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):
        cy, cx, ry, rx = (
            torch.rand(4, generator=g) * torch.tensor([0.4, 0.4, 0.15, 0.15]) + torch.tensor([0.3, 0.3, 0.1, 0.1])
        ).tolist()
        out[i][((y / size - cy) / ry) ** 2 + ((x / size - cx) / rx) ** 2 <= 1] = 1
    return out


IMPLS = ("compat", "upstream_restated", "upstream_published")


def resolve(table: dict, impl: str):
    """The implementation ``impl`` of a group (its factory called); the published code's only
    where BUSSEG_UPSTREAM_DIR provides it, else the benchmark is skipped with the reason."""
    if impl == "upstream_published" and (why := published.missing_requirement()):
        pytest.skip(why)
    return table[impl]()


# ---- RA-BUSSeg ---------------------------------------------------------------------------------


def corr_inputs():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(B, PROJ, H, W, generator=g).relu().requires_grad_()
    logits = torch.randn(B, 2, 2 * H - 1, 2 * W - 1, generator=g)
    weight = torch.randn(B, 2, H, W, generator=g)
    return feat, logits, weight


def corr_step(corr, feat, logits, weight):
    (corr(feat, logits)["out"] * weight).sum().backward()
    feat.grad = None


CORR = {
    "compat": lambda: rabusseg.Corr(nclass=2),
    "upstream_restated": lambda: upstream.corr_forward,
    "upstream_published": lambda: published.rabusseg().Corr(nclass=2),
}


@pytest.mark.parametrize("impl", IMPLS)
def test_corr(benchmark, impl):
    benchmark.group = "rabusseg Corr fwd+bwd (B=8, 256 ch, 65²)"
    corr = resolve(CORR, impl)
    benchmark.pedantic(corr_step, (corr, *corr_inputs()), rounds=3, warmup_rounds=1)


def rank_inputs(impl):
    """The decoder's outputs: the four encoder maps (leaves that require grad), the corr_map
    (upstream: formed; compat: the handle) and the labels at the crop size."""
    g = torch.Generator().manual_seed(1)
    maps = [
        torch.randn(B, c, 2 * H - 1 if l == 0 else H, 2 * W - 1 if l == 0 else W, generator=g).relu().requires_grad_()
        for l, c in enumerate(CHANNELS)
    ]
    proj = torch.randn(B, PROJ, H, W, generator=g).relu()
    corr = rabusseg.CorrelationMap(proj, rabusseg.upstream_scale(PROJ))
    return maps, corr if impl == "compat" else corr.materialize(), lesions(B, CROP, 2)


def rank_step(loss_fn, maps, corr_map, label):
    torch.manual_seed(0)  # the same first landmarks for both
    loss_fn(*maps, corr_map, label).backward()
    for m in maps:
        m.grad = None


RANK = {
    "compat": lambda: rabusseg.compute_rank_loss_landmark,
    "upstream_restated": lambda: upstream.compute_rank_loss_landmark,
    "upstream_published": lambda: published.rabusseg().compute_rank_loss_landmark,
}


@pytest.mark.parametrize("impl", IMPLS)
def test_rank_loss(benchmark, impl):
    benchmark.group = "rabusseg compute_rank_loss_landmark fwd+bwd (B=8, 65², L=4, M=64)"
    loss_fn = resolve(RANK, impl)
    args = rank_inputs(impl)
    if impl == "compat":  # same value as upstream's on these inputs
        maps, corr, label = args
        torch.manual_seed(0)
        ours = rabusseg.compute_rank_loss_landmark(*maps, corr, label)
        torch.manual_seed(0)
        theirs = upstream.compute_rank_loss_landmark(*maps, corr.materialize(), label)
        assert math.isclose(float(ours), float(theirs), rel_tol=1e-4)
    benchmark.pedantic(rank_step, (loss_fn, *args), rounds=3, warmup_rounds=1)


# ---- PH-Net ------------------------------------------------------------------------------------


def pipeline_inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(PB, 3, PS, PS, generator=g)
    prob = torch.randn(PB, 2, PS, PS, generator=g).softmax(1)
    confidence, label = prob.max(1)
    return image, label, confidence, prob


def pipeline(module, image, label, confidence, prob):
    image_p, label_p, confidence_p, prob_p = module.devide_into_patchs(image, label, confidence, prob, PN)
    hard = module.compute_hard_ratio(prob_p)
    return module.generate_patch_data(image_p, label_p, confidence_p, hard.cpu())


PIPELINE = {"compat": lambda: phnet, "upstream_restated": lambda: upstream, "upstream_published": published.phnet}


@pytest.mark.parametrize("impl", IMPLS)
def test_patch_pipeline(benchmark, impl):
    benchmark.group = "phnet devide+hard_ratio+generate_patch_data (B=8, 512², N=16)"
    module = resolve(PIPELINE, impl)
    benchmark.pedantic(pipeline, (module, *pipeline_inputs()), rounds=3, warmup_rounds=1)


def contrast_inputs():
    g = torch.Generator().manual_seed(4)
    prob_l = torch.randn(PB, 2, FEAT, FEAT, generator=g).softmax(1)
    prob_u = torch.randn(PB, 2, FEAT, FEAT, generator=g).softmax(1)
    rep = F.normalize(torch.randn(2 * PB, D, FEAT, FEAT, generator=g), dim=1).requires_grad_()
    rep_teacher = F.normalize(torch.randn(2 * PB, D, FEAT, FEAT, generator=g), dim=1)
    onehot = [F.one_hot(lesions(PB, FEAT, s), 2).permute(0, 3, 1, 2).float() for s in (5, 6)]
    return prob_l, prob_u, rep, rep_teacher, *onehot


def contrast_step(fn, *args):
    fn(*args, PN, (FEAT, FEAT), 0.5).backward()
    args[2].grad = None


CONTRAST = {
    "compat": lambda: phnet.patch_contrast,
    "upstream_restated": lambda: upstream.patch_contrast,
    "upstream_published": lambda: published.phnet().patch_contrast,
}


@pytest.mark.parametrize("impl", IMPLS)
def test_patch_contrast(benchmark, impl):
    benchmark.group = "phnet patch_contrast fwd+bwd (8+8 images, 256 ch, 128², N=16)"
    loss_fn = resolve(CONTRAST, impl)
    benchmark.pedantic(contrast_step, (loss_fn, *contrast_inputs()), rounds=3, warmup_rounds=1)


# ---- peak memory -------------------------------------------------------------------------------

_SETUP = """
import sys; sys.path[:0] = ['benchmarks', 'tests']
import torch, bench_compat as bc
"""
MEMORY = {
    "rabusseg Corr fwd+bwd (B=8, 256 ch, 65²)": (
        "args = bc.corr_inputs(); fn = bc.resolve(bc.CORR, {impl!r})",
        "bc.corr_step(fn, *args)",
    ),
    "rabusseg compute_rank_loss_landmark fwd+bwd (B=8, 65², L=4, M=64)": (
        "args = bc.rank_inputs({impl!r}); fn = bc.resolve(bc.RANK, {impl!r})",
        "bc.rank_step(fn, *args)",
    ),
    "phnet devide+hard_ratio+generate_patch_data (B=8, 512², N=16)": (
        "args = bc.pipeline_inputs(); fn = bc.resolve(bc.PIPELINE, {impl!r})",
        "out = bc.pipeline(fn, *args)",
    ),
    "phnet patch_contrast fwd+bwd (8+8 images, 256 ch, 128², N=16)": (
        "args = bc.contrast_inputs(); fn = bc.resolve(bc.CONTRAST, {impl!r})",
        "bc.contrast_step(fn, *args)",
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", list(MEMORY))
def test_peak_memory(group, impl, record_memory):
    if impl == "upstream_published" and (why := published.missing_requirement()):
        pytest.skip(why)
    setup, stmt = MEMORY[group]
    record_memory(group, impl, peak_extra_mib(_SETUP + setup.format(impl=impl), stmt, warm=True))
