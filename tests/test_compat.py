"""busseg_ops.compat (issue 15): each drop-in function against our restatement of the upstream
code (busseg_ops/compat/upstream.py, the same functions bench_compat.py times): outputs and
gradients in float64 on several shapes (odd ones too), the same random picks for the same seeds
(and the RNGs left in the same state), and signatures equal to upstream's, written down here."""

import inspect
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from busseg_ops.compat import phnet, rabusseg, upstream

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
