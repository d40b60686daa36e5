"""busseg_ops.compat (issues 15, 29): each drop-in function against our restatement of the upstream
code (tests/support/upstream.py): outputs and gradients in float64 on several shapes, the same random
picks for the same seeds (and the RNGs left in the same state), and signatures equal to upstream's,
written down here. With ``BUSSEG_UPSTREAM_DIR`` set (clones of RA-BUSSeg/ and PH-Net/,
tests/support/published.py) the same checks run against the published files too, and
docs/porting.md's edits are applied to copies of them; without it those tests skip, saying why."""

import importlib
import inspect
import random
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import published, upstream

from busseg_ops.compat import phnet, rabusseg

F64 = dict(rtol=1e-9, atol=1e-12)

# ---- signatures ----------------------------------------------------------------------------------

# Upstream's parameter lists as they stand in dodooo1/RA-BUSSeg and jjjsyyy/PH-Net:
# (name, default) pairs, all positional-or-keyword; `...` marks "no default".
UPSTREAM_SIGNATURES = {
    rabusseg.Corr.__init__: [("self", ...), ("nclass", 21)],
    rabusseg.Corr.forward: [("self", ...), ("feature_in", ...), ("out", ...)],
    rabusseg.Corr.sample: [("self", ...), ("corr_map", ...), ("h_in", ...), ("w_in", ...)],
    rabusseg.Corr.normalize_corr_map: [
        ("self", ...),
        ("corr_map", ...),
        ("h_in", ...),
        ("w_in", ...),
        ("h_out", ...),
        ("w_out", ...),
    ],
    rabusseg.compute_rank_loss_landmark: [
        ("feat_x1", ...),
        ("feat_x2", ...),
        ("feat_x3", ...),
        ("high_feat", ...),
        ("corr_map", ...),
        ("label", ...),
    ],
    rabusseg.orthogonal_landmarks_refine: [
        ("q1", ...),
        ("q2", ...),
        ("q3", ...),
        ("qh", ...),
        ("corr_map", ...),
        ("label", ...),
        ("num_landmarks", 64),
    ],
    rabusseg.compute_unsupervised_loss: [("predict", ...), ("target", ...)],
    rabusseg.compute_corr_loss: [("pred_corr", ...), ("target", ...)],
    phnet.devide_into_patchs: [("image", ...), ("label", ...), ("logit", ...), ("pred", ...), ("patch_num", ...)],
    phnet.compute_hard_ratio: [("pred", ...)],
    phnet.generate_patch_data: [
        ("image", ...),
        ("label", ...),
        ("logit", ...),
        ("hard_ratio", ...),
        ("ex_ratio", 40),
        ("alpha", 30),
        ("mix_type", "easy_easy"),
    ],
    phnet.generate_patch_mask: [("hard_ratio", ...), ("ex_ratio", 40), ("alpha", 30)],
    phnet.get_patchs: [("input", ...), ("patch_num", ...)],
    phnet.patch_contrast: [
        ("prob_l_teacher", ...),
        ("prob_u_teacher", ...),
        ("rep_all", ...),
        ("rep_all_teacher", ...),
        ("label_l_small", ...),
        ("label_u_small", ...),
        ("patch_num", ...),
        ("feat_size", ...),
        ("temp", ...),
    ],
    phnet.count_lu_couple: [("ratio_l", ...), ("ratio_u", ...)],
}


@pytest.mark.parametrize("fn", list(UPSTREAM_SIGNATURES), ids=lambda f: f.__qualname__)
def test_signature_matches_upstream(fn):
    expected = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if default is ... else default,
        )
        for name, default in UPSTREAM_SIGNATURES[fn]
    ]
    got = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in expected]


# ---- RA-BUSSeg -----------------------------------------------------------------------------------


def lesion_labels(B, H, W, empty=()):
    """(B, H, W) int64: an ellipse of 1 at a random place per image, a band of 255 (ignored, but
    nonzero for upstream's first draw); images in ``empty`` are all background."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    labels = torch.zeros(B, H, W, dtype=torch.long)
    for b in range(B):
        if b in empty:
            continue
        cy, cx = torch.randint(H // 4, 3 * H // 4 + 1, ()), torch.randint(W // 4, 3 * W // 4 + 1, ())
        labels[b][((y - cy) / (H / 5)) ** 2 + ((x - cx) / (W / 4)) ** 2 <= 1] = 1
        labels[b, : max(1, H // 10)] = 255
    return labels


CORR_CASES = [  # B, C, H, W, K, out grid
    (2, 8, 9, 9, 2, (17, 17)),
    (1, 5, 7, 11, 3, (7, 11)),  # odd C, out already on the feature grid
    (3, 16, 6, 5, 2, (13, 10)),
]


@pytest.mark.parametrize("B,C,H,W,K,out_hw", CORR_CASES)
def test_corr_matches_upstream(B, C, H, W, K, out_hw):
    feat = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, K, *out_hw, dtype=torch.float64, requires_grad=True)
    ref = upstream.corr_forward(feat, logits)
    got = rabusseg.Corr(nclass=K)(feat, logits)
    assert set(got) == set(ref) == {"corr_map", "out"}
    torch.testing.assert_close(got["out"], ref["out"], **F64)
    assert got["corr_map"].shape == ref["corr_map"].shape and len(got["corr_map"]) == B
    torch.testing.assert_close(got["corr_map"].materialize(), ref["corr_map"], **F64)
    weight = torch.randn_like(ref["out"])
    (g_ref,) = torch.autograd.grad((ref["out"] * weight).sum(), feat)
    (g_got,) = torch.autograd.grad((got["out"] * weight).sum(), feat)
    torch.testing.assert_close(g_got, g_ref, **F64)
    assert got["out"].grad_fn is not None and logits.grad is None  # out is detached, as upstream's


RANK_CASES = [  # B, deep grid, layer-1 grid, label grid, channels (x1, x2, x3, high, proj), empty images
    (2, (9, 9), (17, 17), (33, 33), (4, 6, 5, 7, 8), ()),
    (3, (8, 11), (16, 22), (29, 41), (3, 5, 4, 9, 6), (1,)),  # odd sizes, one image without foreground
    (1, (10, 7), (20, 14), (40, 28), (5, 3, 6, 4, 5), (0,)),
]


def rank_inputs(B, deep, fine, label_hw, channels, empty):
    c1, c2, c3, ch, cp = channels
    maps = [
        torch.randn(B, c, *(fine if l == 0 else deep), dtype=torch.float64, requires_grad=True)
        for l, c in enumerate((c1, c2, c3, ch))
    ]
    proj = torch.randn(B, cp, *deep, dtype=torch.float64).relu()
    return maps, proj, lesion_labels(B, *label_hw, empty=empty)


def seeded(seed, fn, *args):
    """fn(*args) right after torch.manual_seed(seed); returns (result, RNG state afterwards)."""
    torch.manual_seed(seed)
    out = fn(*args)
    return out, torch.get_rng_state()


@pytest.mark.parametrize("case", RANK_CASES)
def test_rank_loss_matches_upstream_value_gradients_and_draws(case):
    maps, proj, label = rank_inputs(*case)
    corr = rabusseg.Corr(nclass=2)(proj, torch.zeros(proj.shape[0], 2, 3, 3, dtype=torch.float64))["corr_map"]
    full = upstream.corr_forward(proj, torch.zeros(proj.shape[0], 2, 3, 3, dtype=torch.float64))["corr_map"]
    ref, ref_rng = seeded(7, upstream.compute_rank_loss_landmark, *maps, full, label)
    ref_grads = torch.autograd.grad(ref, maps)
    for corr_map in (corr, full):  # the light handle, and a formed map from code that builds one
        got, rng = seeded(7, rabusseg.compute_rank_loss_landmark, *maps, corr_map, label)
        assert torch.equal(rng, ref_rng)  # the same global-RNG draws
        torch.testing.assert_close(got, ref, **F64)
        for g, r in zip(torch.autograd.grad(got, maps), ref_grads):
            torch.testing.assert_close(g, r, **F64)


@pytest.mark.parametrize("case", RANK_CASES)
def test_landmarks_same_picks_as_upstream_for_a_seed(case):
    maps, proj, label = rank_inputs(*case)
    corr = rabusseg.CorrelationMap(proj, rabusseg.upstream_scale(proj.shape[1]))
    for seed in (0, 1):
        ref, ref_rng = seeded(seed, upstream.orthogonal_landmarks_refine, *maps, corr.materialize(), label, 20)
        got, rng = seeded(seed, rabusseg.orthogonal_landmarks_refine, *maps, corr, label, 20)
        assert torch.equal(rng, ref_rng)
        for g, r in zip(got, ref):
            assert torch.equal(g, r)  # the same pixels, in upstream's (pixel) order


def test_correlation_map_handle():
    feat = torch.randn(4, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    corr = rabusseg.Corr()(feat, torch.randn(4, 2, 5, 7, dtype=torch.float64))["corr_map"]
    full = upstream.corr_forward(feat, torch.zeros(4, 2, 5, 7, dtype=torch.float64))["corr_map"]
    assert corr.shape == full.shape and corr.size(1) == 35 and corr.dim() == 3 and len(corr) == 4
    assert corr.dtype == torch.float64 and corr.device == feat.device
    torch.testing.assert_close(corr[1:3].materialize(), full[1:3], **F64)
    torch.testing.assert_close(corr[torch.tensor([3, 0])].materialize(), full[[3, 0]], **F64)
    torch.testing.assert_close(corr.rows(torch.tensor([0, 34, 7])), full[:, [0, 34, 7]], **F64)
    assert corr.materialize().requires_grad and not corr.detach().materialize().requires_grad
    with pytest.raises(TypeError, match="materialize"):
        corr[0, 3]


def test_upstream_loss_on_our_corr_map_says_which_import_to_change():
    # Corr swapped, upstream's loss kept: its corr_map[b, landmark, :] is our TypeError, naming the fix
    maps, proj, label = rank_inputs(*RANK_CASES[0])
    corr = rabusseg.Corr(nclass=2)(proj, torch.zeros(proj.shape[0], 2, 3, 3, dtype=torch.float64))["corr_map"]
    fix = r"import compute_rank_loss_landmark .*from busseg_ops\.compat\.rabusseg"
    with pytest.raises(TypeError, match=fix):
        upstream.compute_rank_loss_landmark(*maps, corr, label)
    with pytest.raises(TypeError, match=fix):
        corr[0, torch.tensor([3]), :]  # upstream's exact indexing


def wide_unnormalised_maps(B=1, deep=(9, 9), channels=(256, 512, 1024, 2048), seed=0):
    """ResNet-like encoder maps: ReLU'd, unnormalised, 1024/2048 channels deep: pixel-to-landmark
    logits span hundreds, so float32 softmaxes underflow to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    fine = (2 * deep[0] - 1, 2 * deep[1] - 1)
    return [
        torch.randn(B, c, *(fine if l == 0 else deep), generator=g).relu().requires_grad_()
        for l, c in enumerate(channels)
    ]


def test_rank_loss_gradients_stay_finite_where_upstreams_kl_div_gives_nan():
    # torch 2.x kl_div differentiates the target too: d/dq q·log q = log q + 1 is -inf where the
    # target softmax underflowed to 0, and the softmax backward turns 0·(-inf) into NaN
    maps = wide_unnormalised_maps()
    proj = torch.randn(1, 256, 9, 9).relu()
    label = lesion_labels(1, 33, 33)
    corr = rabusseg.CorrelationMap(proj, rabusseg.upstream_scale(256))
    ref, _ = seeded(0, upstream.compute_rank_loss_landmark, *maps, corr.materialize(), label)
    ref_grads = torch.autograd.grad(ref, maps, allow_unused=True)
    assert torch.isfinite(ref) and any(not g.isfinite().all() for g in ref_grads)  # upstream: NaN gradients
    got, _ = seeded(0, rabusseg.compute_rank_loss_landmark, *maps, corr, label)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    grads = torch.autograd.grad(got, maps)
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads)


def test_corr_sample_and_normalize_match_upstream():
    feat = torch.randn(2, 4, 12, 11, dtype=torch.float64)
    module = rabusseg.Corr()
    corr = module(feat, torch.zeros(2, 2, 12, 11, dtype=torch.float64))["corr_map"]
    ref, ref_rng = seeded(3, upstream.corr_sample, corr.materialize(), 12, 11)
    for corr_map in (corr, corr.materialize()):
        got, rng = seeded(3, module.sample, corr_map, 12, 11)
        assert torch.equal(rng, ref_rng)
        torch.testing.assert_close(got, ref, **F64)
    got = module.normalize_corr_map(ref, 12, 11, 23, 9)
    torch.testing.assert_close(got, upstream.normalize_corr_map(ref, 12, 11, 23, 9), **F64)


def test_cross_entropy_terms_match_upstream():
    predict = torch.randn(3, 2, 9, 7, dtype=torch.float64)
    target = torch.randint(0, 2, (3, 9, 7))
    target[0, :2] = 255
    for ours, theirs in (
        (rabusseg.compute_unsupervised_loss, upstream.compute_unsupervised_loss),
        (rabusseg.compute_corr_loss, upstream.compute_corr_loss),
    ):
        torch.testing.assert_close(ours(predict, target), theirs(predict, target), **F64)


def test_rabusseg_bad_inputs():
    maps, proj, label = rank_inputs(*RANK_CASES[0])
    corr = rabusseg.CorrelationMap(proj, 0.5)
    with pytest.raises(ValueError, match="corr_map must be"):
        rabusseg.compute_rank_loss_landmark(*maps, corr[:1], label)
    with pytest.raises(ValueError, match="feat_x2 must be on high_feat's grid"):
        rabusseg.compute_rank_loss_landmark(maps[0], maps[0], maps[2], maps[3], corr, label)
    with pytest.raises(ValueError, match="label must be"):
        rabusseg.compute_rank_loss_landmark(*maps, corr, label[0])
    with pytest.raises(TypeError, match="corr_map must be a CorrelationMap"):
        rabusseg.compute_rank_loss_landmark(*maps, np.zeros((2, 81, 81)), label)
    with pytest.raises(ValueError, match="feature_in"):
        rabusseg.Corr()(proj[0], proj)


# ---- PH-Net --------------------------------------------------------------------------------------

PATCH_CASES = [  # B, C, H, W, N
    (2, 3, 15, 10, 5),
    (1, 1, 7, 7, 7),  # 1×1 patches
    (3, 2, 12, 12, 4),
]


@pytest.mark.parametrize("B,C,H,W,N", PATCH_CASES)
def test_patches_and_hard_ratio_match_upstream(B, C, H, W, N):
    image = torch.randn(B, C, H, W, dtype=torch.float64)
    label = torch.randint(0, 2, (B, H, W))
    logit = torch.rand(B, H, W, dtype=torch.float64)
    pred = torch.randn(B, 2, H, W, dtype=torch.float64).softmax(1)
    ref = upstream.devide_into_patchs(image, label, logit, pred, N)
    got = phnet.devide_into_patchs(image, label, logit, pred, N)
    for g, r, source in zip(got, ref, (image, label, logit, pred)):
        assert torch.equal(g, r) and g.is_contiguous()
        assert g.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()  # a copy, as upstream's
    assert torch.equal(phnet.get_patchs(image, float(N)), ref[0])
    hard = phnet.compute_hard_ratio(got[3])
    torch.testing.assert_close(hard, upstream.compute_hard_ratio(ref[3]), **F64)
    assert hard.shape == (B, N, N) and not hard.requires_grad


@pytest.mark.parametrize("K", [2, 3])
def test_hard_ratio_any_leading_shape_and_float32(K):
    pred = torch.randn(2, 3, 4, K, 5, 3, requires_grad=True).softmax(3)  # upstream divides by log 2 for any K
    got = phnet.compute_hard_ratio(pred)
    torch.testing.assert_close(got, upstream.compute_hard_ratio(pred), rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 3, 4) and not got.requires_grad


def seeded_np(seed, fn, *args, **kw):
    """fn after seeding NumPy's and Python's global RNGs; returns (result, both states after)."""
    np.random.seed(seed)
    random.seed(seed)
    out = fn(*args, **kw)
    return out, (np.random.get_state()[1].copy(), random.getstate())


def same_states(a, b):
    return np.array_equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("N,ex_ratio,alpha", [(4, 40, 30), (5, 20, 50), (16, 40, 30), (3, 100, 0)])
def test_generate_patch_mask_same_picks_for_a_seed(N, ex_ratio, alpha):
    hard = torch.rand(N, N, dtype=torch.float64)
    for seed in (0, 1):
        ref, ref_states = seeded_np(seed, upstream.generate_patch_mask, hard, ex_ratio, alpha)
        got, states = seeded_np(seed, phnet.generate_patch_mask, hard, ex_ratio, alpha)
        assert same_states(states, ref_states)
        for g, r in zip(got, ref):
            assert torch.equal(g, r) and g.dtype == torch.bool and g.device.type == "cpu"


PATCH_DATA_CASES = [  # B, N, C, h, w
    (3, 4, 3, 3, 2),
    (2, 5, 1, 2, 3),  # two images: easy_rand's last image reads its own patches back
    (1, 4, 2, 2, 2),
    (4, 4, 3, 1, 1),
]


@pytest.mark.parametrize("mix_type", phnet.MIX_TYPES)
@pytest.mark.parametrize("B,N,C,h,w", PATCH_DATA_CASES)
def test_generate_patch_data_matches_upstream(mix_type, B, N, C, h, w):
    image = torch.randn(B, N, N, C, h, w, dtype=torch.float64, requires_grad=True)
    label = torch.randint(0, 2, (B, N, N, h, w))
    logit = torch.rand(B, N, N, h, w, dtype=torch.float64)
    hard = torch.rand(B, N, N, dtype=torch.float64)
    kept = [t.detach().clone() for t in (image, label, logit)]
    # upstream writes into its patch tensors: give it copies that are still part of the graph
    ref, ref_states = seeded_np(
        11, upstream.generate_patch_data, image.clone(), label.clone(), logit.clone(), hard, mix_type=mix_type
    )
    got, states = seeded_np(11, phnet.generate_patch_data, image, label, logit, hard, mix_type=mix_type)
    assert same_states(states, ref_states)
    for g, r in zip(got, ref):
        assert torch.equal(g, r) and g.is_contiguous()
    assert all(torch.equal(t, k) for t, k in zip((image, label, logit), kept))  # inputs untouched
    weight = torch.randn_like(ref[0])
    (g_ref,) = torch.autograd.grad((ref[0] * weight).sum(), image)
    (g_got,) = torch.autograd.grad((got[0] * weight).sum(), image)
    torch.testing.assert_close(g_got, g_ref, **F64)


def onehot(labels, K):
    return F.one_hot(labels, K).permute(0, 3, 1, 2).double()


CONTRAST_CASES = [  # labelled batch, K, D, rep grid, feat_size, N, temp, lesion labels (else noise)
    (2, 2, 8, (12, 9), (12, 9), 3, 0.5, False),  # the rep grid is feat_size: no resize
    (3, 2, 5, (6, 5), (12, 10), 2, 0.1, False),  # resized rep, odd sizes
    (2, 3, 4, (8, 8), (8, 8), 2, 0.7, False),  # three classes: upstream's negative is prototype (1 - c) mod K
    (2, 2, 6, (16, 12), (16, 12), 4, 0.5, True),  # lesions: only patches on the boundary take part
    (3, 2, 4, (9, 10), (18, 24), 6, 0.2, True),
]


def contrast_inputs(Bl, K, D, rep_hw, feat_size, lesions=False):
    prob_l = torch.randn(Bl, K, 7, 5, dtype=torch.float64).softmax(1)
    prob_u = torch.randn(Bl, K, 7, 5, dtype=torch.float64).softmax(1)
    rep = torch.randn(2 * Bl, D, *rep_hw, dtype=torch.float64, requires_grad=True)
    rep_teacher = torch.randn(2 * Bl, D, *rep_hw, dtype=torch.float64)
    small = (feat_size[0] // 2 + 1, feat_size[1] // 2 + 1)  # labels come at another grid (nearest)
    if lesions:
        label_l, label_u = lesion_labels(Bl, *small).clamp(max=1), lesion_labels(Bl, *small).clamp(max=1)
    else:
        label_l, label_u = torch.randint(0, K, (Bl, *small)), torch.randint(0, K, (Bl, *small))
    return prob_l, prob_u, rep, rep_teacher, onehot(label_l, K), onehot(label_u, K)


@pytest.mark.parametrize("Bl,K,D,rep_hw,feat_size,N,temp,lesions", CONTRAST_CASES)
def test_patch_contrast_matches_upstream(Bl, K, D, rep_hw, feat_size, N, temp, lesions):
    inputs = contrast_inputs(Bl, K, D, rep_hw, feat_size, lesions)
    ref = upstream.patch_contrast(*inputs, N, feat_size, temp)
    got = phnet.patch_contrast(*inputs, N, feat_size, temp)
    torch.testing.assert_close(got, ref, **F64)
    assert got.item() > 0
    (g_ref,) = torch.autograd.grad(ref, inputs[2])
    (g_got,) = torch.autograd.grad(got, inputs[2])
    torch.testing.assert_close(g_got, g_ref, **F64)


def test_patch_contrast_without_mixed_patches_is_zero_with_zero_gradient():
    prob_l, prob_u, rep, rep_teacher, label_l, label_u = contrast_inputs(2, 2, 4, (8, 8), (8, 8))
    background = torch.zeros_like(label_u)
    background[:, 0] = 1
    for args in ((label_l, background), (background, label_u)):  # no unlabelled / no labelled patch
        got = phnet.patch_contrast(prob_l, prob_u, rep, rep_teacher, *args, 2, (8, 8), 0.5)
        assert got.item() == 0.0
        (grad,) = torch.autograd.grad(got, rep)
        assert torch.equal(grad, torch.zeros_like(rep))
    ref = upstream.patch_contrast(prob_l, prob_u, rep, rep_teacher, label_l, background, 2, (8, 8), 0.5)
    assert ref.item() == 0.0  # upstream's answer without unlabelled patches (without labelled ones it fails)


def test_count_lu_couple_matches_upstream():
    ratio_l, ratio_u = torch.rand(7, dtype=torch.float64), torch.rand(11, dtype=torch.float64)
    ratio_l[3] = ratio_l[5]  # a tie: the first wins
    assert torch.equal(phnet.count_lu_couple(ratio_l, ratio_u), upstream.count_lu_couple(ratio_l, ratio_u))


def test_phnet_bad_inputs():
    with pytest.raises(ValueError, match="does not divide its size 10×12"):
        phnet.get_patchs(torch.zeros(1, 10, 12), 4)
    with pytest.raises(ValueError, match="patch_num must be a positive integer"):
        phnet.get_patchs(torch.zeros(1, 8, 8), 2.5)
    hard = torch.rand(2, 4, 4)
    patches = torch.zeros(2, 4, 4, 3, 2, 2), torch.zeros(2, 4, 4, 2, 2), torch.zeros(2, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="mix_type must be one of"):
        phnet.generate_patch_data(*patches, hard, mix_type="hard_hard")
    with pytest.raises(ValueError, match="hard_ratio must be"):
        phnet.generate_patch_data(*patches, hard[:1])
    with pytest.raises(ValueError, match="alpha=90 leaves 2 of 16 patches"):
        np.random.seed(0)
        phnet.generate_patch_mask(hard[0], alpha=90)
    prob_l, prob_u, rep, rep_teacher, label_l, label_u = contrast_inputs(2, 2, 4, (8, 8), (8, 8))
    with pytest.raises(ValueError, match="as many unlabelled as labelled"):
        phnet.patch_contrast(prob_l, prob_u[:1], rep, rep_teacher, label_l, label_u, 2, (8, 8), 0.5)
    with pytest.raises(ValueError, match="does not divide feat_size"):
        phnet.patch_contrast(prob_l, prob_u, rep, rep_teacher, label_l, label_u, 3, (8, 8), 0.5)


# ---- the published files (BUSSEG_UPSTREAM_DIR) ------------------------------------------------------

needs_published = pytest.mark.skipif(
    published.missing_requirement() is not None, reason=str(published.missing_requirement())
)


@needs_published
@pytest.mark.parametrize("B,C,H,W,K,out_hw", CORR_CASES)
def test_published_corr(B, C, H, W, K, out_hw):
    feat = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, K, *out_hw, dtype=torch.float64)
    theirs = published.rabusseg().Corr(nclass=K)(feat, logits)
    restated = upstream.corr_forward(feat, logits)
    ours = rabusseg.Corr(nclass=K)(feat, logits)
    torch.testing.assert_close(restated["out"], theirs["out"], **F64)
    torch.testing.assert_close(restated["corr_map"], theirs["corr_map"], **F64)
    torch.testing.assert_close(ours["out"], theirs["out"], **F64)
    torch.testing.assert_close(ours["corr_map"].materialize(), theirs["corr_map"], **F64)
    weight = torch.randn_like(theirs["out"])
    (g_theirs,) = torch.autograd.grad((theirs["out"] * weight).sum(), feat)
    (g_ours,) = torch.autograd.grad((ours["out"] * weight).sum(), feat)
    torch.testing.assert_close(g_ours, g_theirs, **F64)


@needs_published
def test_published_corr_sample_and_normalize():
    feat = torch.randn(2, 4, 12, 11, dtype=torch.float64)
    theirs = published.rabusseg().Corr()
    full = theirs(feat, torch.zeros(2, 2, 12, 11, dtype=torch.float64))["corr_map"]
    ref, ref_rng = seeded(3, theirs.sample, full, 12, 11)
    corr = rabusseg.CorrelationMap(feat, rabusseg.upstream_scale(4))
    for fn, corr_map in ((rabusseg.Corr().sample, corr), (upstream.corr_sample, full)):
        got, rng = seeded(3, fn, corr_map, 12, 11)
        assert torch.equal(rng, ref_rng)
        torch.testing.assert_close(got, ref, **F64)
    ref = theirs.normalize_corr_map(ref, 12, 11, 23, 9)
    torch.testing.assert_close(rabusseg.Corr().normalize_corr_map(got, 12, 11, 23, 9), ref, **F64)
    torch.testing.assert_close(upstream.normalize_corr_map(got, 12, 11, 23, 9), ref, **F64)


@needs_published
@pytest.mark.parametrize("case", RANK_CASES)
def test_published_rank_loss_and_landmarks(case):
    maps, proj, label = rank_inputs(*case)
    corr = rabusseg.CorrelationMap(proj, rabusseg.upstream_scale(proj.shape[1]))
    theirs = published.rabusseg()
    ref, ref_rng = seeded(5, theirs.compute_rank_loss_landmark, *maps, corr.materialize(), label)
    ref_grads = torch.autograd.grad(ref, maps)
    for fn, corr_map in (
        (upstream.compute_rank_loss_landmark, corr.materialize()),
        (rabusseg.compute_rank_loss_landmark, corr),
    ):
        got, rng = seeded(5, fn, *maps, corr_map, label)
        assert torch.equal(rng, ref_rng)
        torch.testing.assert_close(got, ref, **F64)
        for g, r in zip(torch.autograd.grad(got, maps), ref_grads):
            torch.testing.assert_close(g, r, **F64)
    ref, ref_rng = seeded(2, theirs.orthogonal_landmarks_refine, *maps, corr.materialize(), label, 20)
    for fn, corr_map in (
        (upstream.orthogonal_landmarks_refine, corr.materialize()),
        (rabusseg.orthogonal_landmarks_refine, corr),
    ):
        got, rng = seeded(2, fn, *maps, corr_map, label, 20)
        assert torch.equal(rng, ref_rng) and all(torch.equal(g, r) for g, r in zip(got, ref))


@needs_published
def test_published_rank_loss_nan_gradients_on_wide_unnormalised_features():
    # what docs/porting.md says of upstream: NaN gradients under torch 2.x, ours finite
    maps = wide_unnormalised_maps()
    proj = torch.randn(1, 256, 9, 9).relu()
    label = lesion_labels(1, 33, 33)
    corr = rabusseg.CorrelationMap(proj, rabusseg.upstream_scale(256))
    ref, _ = seeded(0, published.rabusseg().compute_rank_loss_landmark, *maps, corr.materialize(), label)
    assert torch.isfinite(ref) and not all(g.isfinite().all() for g in torch.autograd.grad(ref, maps))
    got, _ = seeded(0, rabusseg.compute_rank_loss_landmark, *maps, corr, label)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert all(g.isfinite().all() for g in torch.autograd.grad(got, maps))


@needs_published
def test_published_loss_on_our_corr_map_says_which_import_to_change():
    maps, proj, label = rank_inputs(*RANK_CASES[0])
    corr = rabusseg.Corr(nclass=2)(proj, torch.zeros(proj.shape[0], 2, 3, 3, dtype=torch.float64))["corr_map"]
    with pytest.raises(TypeError, match=r"import compute_rank_loss_landmark .*from busseg_ops\.compat\.rabusseg"):
        published.rabusseg().compute_rank_loss_landmark(*maps, corr, label)


@needs_published
def test_published_cross_entropy_terms():
    predict = torch.randn(3, 2, 9, 7, dtype=torch.float64)
    target = torch.randint(0, 2, (3, 9, 7))
    target[0, :2] = 255
    theirs = published.rabusseg()
    for name in ("compute_unsupervised_loss", "compute_corr_loss"):
        ref = getattr(theirs, name)(predict, target)
        torch.testing.assert_close(getattr(rabusseg, name)(predict, target), ref, **F64)
        torch.testing.assert_close(getattr(upstream, name)(predict, target), ref, **F64)


@needs_published
@pytest.mark.parametrize("B,C,H,W,N", PATCH_CASES)
def test_published_patches_and_hard_ratio(B, C, H, W, N):
    image = torch.randn(B, C, H, W, dtype=torch.float64)
    label = torch.randint(0, 2, (B, H, W))
    logit = torch.rand(B, H, W, dtype=torch.float64)
    pred = torch.randn(B, 2, H, W, dtype=torch.float64).softmax(1)
    theirs = published.phnet()
    ref = theirs.devide_into_patchs(image, label, logit, pred, N)
    for module in (phnet, upstream):
        assert all(torch.equal(g, r) for g, r in zip(module.devide_into_patchs(image, label, logit, pred, N), ref))
        torch.testing.assert_close(module.compute_hard_ratio(ref[3]), theirs.compute_hard_ratio(ref[3]), **F64)
    assert torch.equal(phnet.get_patchs(image, N), theirs.get_patchs(image, N))
    ratio_l, ratio_u = torch.rand(7, dtype=torch.float64), torch.rand(11, dtype=torch.float64)
    assert torch.equal(phnet.count_lu_couple(ratio_l, ratio_u), theirs.count_lu_couple(ratio_l, ratio_u))


@needs_published
@pytest.mark.parametrize("N,ex_ratio,alpha", [(4, 40, 30), (5, 20, 50), (16, 40, 30)])
def test_published_patch_mask_same_picks(N, ex_ratio, alpha):
    hard = torch.rand(N, N, dtype=torch.float64)
    ref, ref_states = seeded_np(4, published.phnet().generate_patch_mask, hard, ex_ratio, alpha)
    for module in (phnet, upstream):
        got, states = seeded_np(4, module.generate_patch_mask, hard, ex_ratio, alpha)
        assert same_states(states, ref_states) and all(torch.equal(g, r) for g, r in zip(got, ref))


@needs_published
@pytest.mark.parametrize("mix_type", phnet.MIX_TYPES)
@pytest.mark.parametrize("B,N,C,h,w", PATCH_DATA_CASES)
def test_published_generate_patch_data(mix_type, B, N, C, h, w):
    image = torch.randn(B, N, N, C, h, w, dtype=torch.float64)
    label = torch.randint(0, 2, (B, N, N, h, w))
    logit = torch.rand(B, N, N, h, w, dtype=torch.float64)
    hard = torch.rand(B, N, N, dtype=torch.float64)
    fresh = lambda: [t.clone() for t in (image, label, logit)]  # noqa: E731  (upstream writes into them)
    ref, ref_states = seeded_np(9, published.phnet().generate_patch_data, *fresh(), hard, mix_type=mix_type)
    for module in (phnet, upstream):
        got, states = seeded_np(9, module.generate_patch_data, *fresh(), hard, mix_type=mix_type)
        assert same_states(states, ref_states) and all(torch.equal(g, r) for g, r in zip(got, ref))


@needs_published
@pytest.mark.parametrize("Bl,K,D,rep_hw,feat_size,N,temp,lesions", [c for c in CONTRAST_CASES if c[1] == 2])
def test_published_patch_contrast(Bl, K, D, rep_hw, feat_size, N, temp, lesions):
    inputs = contrast_inputs(Bl, K, D, rep_hw, feat_size, lesions)
    ref = published.phnet().patch_contrast(*inputs, N, feat_size, temp)
    (g_ref,) = torch.autograd.grad(ref, inputs[2])
    for fn in (phnet.patch_contrast, upstream.patch_contrast):
        got = fn(*inputs, N, feat_size, temp)
        torch.testing.assert_close(got, ref, **F64)
        (g_got,) = torch.autograd.grad(got, inputs[2])
        torch.testing.assert_close(g_got, g_ref, **F64)


def _swapped_copy(tmp_path, clone, package, new_name, edits):
    """A copy of ``clone``/``package`` as the package ``new_name`` (so it does not collide with the
    loaded original) with ``edits`` {relative file: function of its text}; returns the import root."""
    root = tmp_path / "swapped"
    shutil.copytree(published.upstream_dir() / clone / package, root / new_name)
    for relative, edit in edits.items():
        path = root / new_name / relative
        path.write_text(edit(path.read_text()))
    return root


def _import(root, name):
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(root))


@needs_published
def test_porting_doc_swap_into_published_decoder(tmp_path):
    # docs/porting.md, RA-BUSSeg step 1: decoder.py ends without a newline, so the import line is
    # appended after one (a bare `echo >>` joins it to the last line: a SyntaxError)
    text = (published.upstream_dir() / "RA-BUSSeg/rabusseg/models/decoder.py").read_text()
    assert not text.endswith("\n")
    line = "from busseg_ops.compat.rabusseg import Corr  # noqa: E402,F811  (replaces the class above)"
    with pytest.raises(SyntaxError):
        compile(text + line + "\n", "decoder.py", "exec")
    root = _swapped_copy(
        tmp_path, "RA-BUSSeg", "rabusseg", "rabusseg_swapped", {"models/decoder.py": lambda t: t + "\n" + line + "\n"}
    )
    with published._importable(root):
        decoder = _import(root, "rabusseg_swapped.models.decoder")
        losses = _import(root, "rabusseg_swapped.utils.loss_helper")
    assert decoder.Corr is rabusseg.Corr
    torch.manual_seed(0)
    head = decoder.dec_deeplabv3_plus(in_planes=64, num_classes=2, inner_planes=8, dilations=(1, 2, 3)).eval()
    head.proj[0] = torch.nn.Conv2d(64, 256, 3, padding=1)  # upstream's proj takes the 2048-ch deepest map
    x1, x2, x3, x4 = (
        torch.randn(2, 256, 17, 17),
        torch.randn(2, 16, 9, 9),
        torch.randn(2, 32, 9, 9),
        torch.randn(2, 64, 9, 9),
    )
    res = head([x1, x2, x3, x4])
    assert isinstance(res["corr_map"], rabusseg.CorrelationMap) and res["corr_out"].shape == (2, 2, 17, 17)
    maps = [t.requires_grad_() for t in (res["feat_x1"], res["feat_x2"], res["feat_x3"], res["high_feat"])]
    label = lesion_labels(2, 33, 33)
    loss = rabusseg.compute_rank_loss_landmark(*maps, res["corr_map"], label)  # step 2: our loss takes it
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="from busseg_ops.compat.rabusseg"):  # upstream's loss kept
        losses.compute_rank_loss_landmark(*maps, res["corr_map"], label)


@needs_published
def test_porting_doc_swap_into_published_patch_helper(tmp_path):
    # docs/porting.md, PH-Net: one line at the end of model/patch_helper.py (which ends in a newline)
    assert (published.upstream_dir() / "PH-Net/model/patch_helper.py").read_text().endswith("\n")
    line = "from busseg_ops.compat.phnet import *  # noqa: E402,F401,F403"
    root = _swapped_copy(tmp_path, "PH-Net", "model", "phnet_swapped", {"patch_helper.py": lambda t: t + line + "\n"})
    helper = _import(root, "phnet_swapped.patch_helper")
    for name in phnet.__all__:
        assert getattr(helper, name) is getattr(phnet, name), name
