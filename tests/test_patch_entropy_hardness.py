"""PH-Net patch ops (SPEC §3–§5, rigorous sampling of §6): every backend against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backends, devices, tolerance

import busseg_ops
from busseg_ops import adaptive_patch_cutmix
from busseg_ops import patch_entropy_hardness as hardness

SHAPES = [  # B, K, H, W, patch (h, w)
    (2, 2, 8, 8, (4, 4)),
    (1, 3, 9, 15, (3, 5)),  # B=1, odd sizes, K=3
    (3, 2, 12, 10, (6, 2)),
    (2, 5, 7, 7, (7, 7)),  # one patch per image
]


def pooled_entropy(p, patch, eps=1e-10):
    """Independent oracle: avg_pool2d of the normalised pixel entropy."""
    ent = -(p * torch.log(p + eps)).sum(1, keepdim=True) / math.log(p.shape[1])
    return F.avg_pool2d(ent, patch, patch)[:, 0]


@pytest.mark.parametrize("from_logits", [False, True])
def test_reference_hardness_matches_avg_pool_of_entropy(from_logits):
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    p = x.softmax(1)
    with busseg_ops.use_backend("reference"):
        r = hardness(x if from_logits else p, patch_size=(4, 2), from_logits=from_logits)
    torch.testing.assert_close(r, pooled_entropy(p, (4, 2)))
    assert r.min() >= 0 and r.max() <= 1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("from_logits", [False, True])
def test_hardness_backends_match_reference(device, shape, from_logits):
    B, K, H, W, patch = shape
    logits = torch.randn(B, K, H, W, device=device) * 3
    x = (logits if from_logits else logits.softmax(1)).requires_grad_()
    grad = torch.randn(B, H // patch[0], W // patch[1], device=device)
    with busseg_ops.use_backend("reference"):
        ref = hardness(x, patch_size=patch, from_logits=from_logits)
    (ref_g,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ref, pooled_entropy(logits.softmax(1), patch), **tolerance(torch.float32))
    for backend in backends(device):
        with busseg_ops.use_backend(backend):
            out = hardness(x, patch_size=patch, from_logits=from_logits)
        (g,) = torch.autograd.grad(out, x, grad)
        torch.testing.assert_close(out, ref, **tolerance(torch.float32), msg=f"{backend} out")
        torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-4, msg=f"{backend} grad")


def test_num_patches_equals_patch_size_and_layouts():
    x = torch.randn(2, 2, 12, 16).softmax(1)
    expected = hardness(x, patch_size=(3, 4))
    torch.testing.assert_close(hardness(x, num_patches=4), expected)
    torch.testing.assert_close(hardness(x.to(memory_format=torch.channels_last), num_patches=4), expected)
    torch.testing.assert_close(hardness(x.transpose(2, 3).contiguous().transpose(2, 3), num_patches=4), expected)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_hardness_gradcheck_float64(backend, from_logits):
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    x = (x if from_logits else x.softmax(1)).requires_grad_()
    with busseg_ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: hardness(t, patch_size=(2, 3), from_logits=from_logits), (x,))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: hardness(x, patch_size=(3, 4)), ValueError, r"patch_size 3×4 does not divide the map size 8×8"),
        (lambda x: hardness(x, num_patches=3), ValueError, r"num_patches 3×3 does not divide the map size 8×8"),
        (lambda x: hardness(x), ValueError, "exactly one of num_patches and patch_size"),
        (lambda x: hardness(x, num_patches=2, patch_size=4), ValueError, "exactly one"),
        (lambda x: hardness(x[:, :1], num_patches=2), ValueError, "K >= 2"),
        (lambda x: hardness(x[0], num_patches=2), ValueError, "x must have 4 dims"),
        (lambda x: hardness(x.long(), num_patches=2), TypeError, "x must be one of float32"),
        (lambda x: hardness(x, num_patches=0), ValueError, "num_patches must be >= 1"),
        (lambda x: hardness(x[:, :, :0], num_patches=2), ValueError, "x is empty"),
    ],
)
def test_hardness_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.rand(2, 2, 8, 8))


def test_hardness_direct_op_call_is_checked_in_cpp():
    with pytest.raises(ValueError, match=r"patch size \(3, 3\) must divide the map size \(8, 8\)"):
        torch.ops.busseg.patch_entropy_hardness_forward(torch.rand(1, 2, 8, 8), 3, 3, False, 1e-10)


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_hardness_nan_propagates(backend):
    x = torch.rand(1, 2, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with busseg_ops.use_backend(backend):
        r = hardness(x, num_patches=2)
    assert r[0, 0, 0].isnan() and not r[0, 1, 1].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-10, 0.1])
def test_hardness_two_class_logits_path(dtype, eps):
    """K = 2 from logits has a one-pass kernel (one exp per pixel): odd widths (SIMD remainders),
    logits far apart (a probability below eps) and a large eps against the reference."""
    x = torch.randn(3, 2, 10, 37, dtype=dtype) * 4
    x[0, 0, :2] += 60  # p of class 1 ≈ e^-60 there
    grad = torch.randn(3, 5, 1, dtype=dtype)
    outs = {}
    for backend in ("reference", "cpu"):
        xb = x.clone().requires_grad_()
        with busseg_ops.use_backend(backend):
            r = hardness(xb, patch_size=(2, 37), from_logits=True, eps=eps)
        outs[backend] = (r, *torch.autograd.grad(r, xb, grad))
    tol = tolerance(dtype)
    torch.testing.assert_close(outs["cpu"][0], outs["reference"][0], **tol)
    torch.testing.assert_close(outs["cpu"][1], outs["reference"][1], **tol)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_hardness_two_class_non_finite_logits_match_reference(value):
    x = torch.randn(1, 2, 4, 4)
    x[0, 1, 0, 0] = value
    with busseg_ops.use_backend("reference"):
        ref = hardness(x, num_patches=2, from_logits=True)
    with busseg_ops.use_backend("cpu"):
        out = hardness(x, num_patches=2, from_logits=True)
    torch.testing.assert_close(out, ref, equal_nan=True)


# ---- cutmix ----------------------------------------------------------------------------------


def cutmix_inputs(B, H, W, device="cpu"):
    image = torch.randn(B, 3, H, W, device=device)
    label = torch.randint(0, 2, (B, H, W), device=device)
    conf = torch.rand(B, H, W, device=device)
    return [image, label, conf]


def expand(mask, H, W):
    return mask.repeat_interleave(H // mask.shape[1], 1).repeat_interleave(W // mask.shape[2], 2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("B,H,W,N", [(4, 16, 16, 4), (3, 15, 9, 3), (2, 8, 12, (2, 3))])
def test_cutmix_follows_the_mask_from_the_next_image(device, B, H, W, N):
    tensors = cutmix_inputs(B, H, W, device)
    nh, nw = (N, N) if isinstance(N, int) else N
    hard = torch.rand(B, nh, nw, device=device)
    k = 2
    results = {}
    for backend in ["reference", *[b for b in backends(device) if b != "triton"]]:
        g = torch.Generator(device=device).manual_seed(7)
        with busseg_ops.use_backend(backend):
            results[backend] = adaptive_patch_cutmix(tensors, hard, k, (0.3, 0.7), generator=g)
    mixed, mask = results["reference"]
    keep = expand(mask, H, W)
    nxt = [t.roll(-1, 0) for t in tensors]
    assert torch.equal(mixed[0], torch.where(keep[:, None], tensors[0], nxt[0]))
    for m, t, n in zip(mixed[1:], tensors[1:], nxt[1:]):  # labels and confidences: the same mask
        assert torch.equal(m, torch.where(keep, t, n))
        assert m.dtype == t.dtype
    # the k hardest patches of every image are shielded
    top = hard.flatten(1).topk(k, 1).indices
    assert mask.flatten(1).gather(1, top).all()
    assert (~mask).any()  # something was mixed (n >= round(0.3 N²) >= 1)
    for backend, (m_b, mask_b) in results.items():
        assert torch.equal(mask_b, mask), backend
        for a, b in zip(m_b, mixed):
            assert torch.equal(a, b), backend


def test_cutmix_share_respects_range_and_cap():
    B, N = 64, 4
    hard = torch.rand(B, N, N)
    g = torch.Generator().manual_seed(0)
    mask = busseg_ops.cutmix_patch_mask(hard, 3, (0.25, 0.5), g)
    replaced = (~mask).flatten(1).sum(1)
    assert replaced.min() >= 4 and replaced.max() <= 8
    assert replaced.unique().numel() > 1  # the share is drawn per image
    capped = busseg_ops.cutmix_patch_mask(hard, 14, (0.9, 1.0), g)
    assert torch.all((~capped).flatten(1).sum(1) == 2)  # n capped at N² − k


def test_cutmix_batch_of_one_is_a_noop_and_generator_reproduces():
    tensors = cutmix_inputs(1, 8, 8)
    mixed, mask = adaptive_patch_cutmix(tensors, torch.rand(1, 2, 2), 0)
    assert mask.all() and mask.shape == (1, 2, 2) and mask.dtype == torch.bool
    for m, t in zip(mixed, tensors):
        assert torch.equal(m, t)
    tensors = cutmix_inputs(3, 8, 8)
    hard = torch.rand(3, 4, 4)
    a = adaptive_patch_cutmix(tensors, hard, 1, generator=torch.Generator().manual_seed(5))
    b = adaptive_patch_cutmix(tensors, hard, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_cutmix_channels_last_and_strided_inputs():
    image = torch.randn(3, 4, 8, 8).to(memory_format=torch.channels_last)
    label = torch.randint(0, 2, (3, 8, 16))[:, :, ::2]
    hard = torch.rand(3, 2, 2)
    g = torch.Generator().manual_seed(1)
    (mi, ml), mask = adaptive_patch_cutmix([image, label], hard, 1, generator=g)
    keep = expand(mask, 8, 8)
    assert torch.equal(mi, torch.where(keep[:, None], image, image.roll(-1, 0)))
    assert torch.equal(ml, torch.where(keep, label, label.roll(-1, 0)))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda t, h: adaptive_patch_cutmix(t, h, 17), ValueError, r"shield_count must be <= N² = 16"),
        (lambda t, h: adaptive_patch_cutmix(t, h[:, :3], 1), ValueError, "grid 3×4 does not divide"),
        (lambda t, h: adaptive_patch_cutmix([t[0], t[1][:1]], h, 1), ValueError, r"tensors\[1\]"),
        (lambda t, h: adaptive_patch_cutmix(t[0], h, 1), TypeError, "tensors must be a non-empty list"),
        (lambda t, h: adaptive_patch_cutmix([], h, 1), TypeError, "tensors must be a non-empty list"),
        (lambda t, h: adaptive_patch_cutmix(t, h, 1, (0.6, 0.2)), ValueError, "mix_range"),
        (lambda t, h: adaptive_patch_cutmix(t, h[0], 1), ValueError, "hardness must have 3 dims"),
        (lambda t, h: adaptive_patch_cutmix([t[0][:, :, :0]], h, 1), ValueError, r"tensors\[0\] is empty"),
        (lambda t, h: busseg_ops.shield_count(0.3, 1.5, 16), ValueError, "progress"),
    ],
)
def test_cutmix_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(cutmix_inputs(2, 8, 8), torch.rand(2, 4, 4))


def test_shield_count_eq5():
    assert busseg_ops.shield_count(0.3, 0.0, 256) == 0
    assert busseg_ops.shield_count(0.3, 0.5, 256) == 38  # floor(0.3 * 0.5 * 256) = floor(38.4)
    assert busseg_ops.shield_count(0.3, 1.0, 100) == 30


def test_cutmix_opcheck_and_compile():
    tensors = [torch.randn(3, 2, 6, 8), torch.randint(0, 3, (3, 6, 8)), torch.rand(3, 6, 8, dtype=torch.float64)]
    mask = torch.rand(3, 2, 4) > 0.5
    torch.library.opcheck(torch.ops.busseg.patch_cutmix, (tensors, mask))
    fn = torch.compile(lambda ts, m: torch.ops.busseg.patch_cutmix(ts, m), fullgraph=True)
    for a, b in zip(fn(tensors, mask), busseg_ops.reference.patch_cutmix(tensors, mask)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cutmix_cpu_splits_bytes_across_threads(threads):
    """The CPU kernel splits the output bytes of all tensors between threads: element sizes from
    1 to 8 bytes, a channel dimension and runs of patches must come out exactly as the reference."""
    B, H, W = 3, 12, 20
    tensors = [
        torch.randint(0, 255, (B, H, W), dtype=torch.uint8),
        torch.randn(B, 2, H, W, dtype=torch.float64),
        torch.randint(-9, 9, (B, 1, 3, H, W), dtype=torch.int16),
        torch.randn(B, H, W),
    ]
    mask = torch.rand(B, 4, 5) > 0.4
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.busseg.patch_cutmix(tensors, mask)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(out, busseg_ops.reference.patch_cutmix(tensors, mask)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_cutmix_cpu_empty_maps():
    for shape in ((2, 3, 0, 4), (2, 3, 4, 0)):
        out = torch.ops.busseg.patch_cutmix([torch.rand(shape)], torch.ones(2, 1, 2, dtype=torch.bool))
        assert out[0].shape == shape


# ---- hardness opcheck / compile --------------------------------------------------------------


def test_hardness_opcheck():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    probs = x.detach().softmax(1).requires_grad_()
    for t, logits in ((probs, False), (x, True)):
        torch.library.opcheck(torch.ops.busseg.patch_entropy_hardness_forward, (t, 3, 2, logits, 1e-10))
    grad = torch.randn(2, 2, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.busseg.patch_entropy_hardness_backward, (grad, x.detach(), 3, 2, True, 1e-10))
    if "triton" in busseg_ops.available_backends("cpu"):
        torch.library.opcheck(
            torch.ops.busseg.patch_entropy_hardness_forward_triton,
            (x.float(), 3, 2, True, 1e-10),
            test_utils=("test_schema", "test_autograd_registration"),
        )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_hardness_torch_compile_fullgraph(backend):
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    with busseg_ops.use_backend(backend):
        expected = hardness(x, num_patches=4, from_logits=True).square().sum()
        (g_expected,) = torch.autograd.grad(expected, x)
        fn = torch.compile(lambda t: hardness(t, num_patches=4, from_logits=True).square().sum(), fullgraph=True)
        loss = fn(x)
        (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(g, g_expected)


# ---- §5 losses and rigorous sampling ---------------------------------------------------------


def test_confidence_masked_cross_entropy_eq8_9():
    logits = torch.randn(2, 2, 5, 6, requires_grad=True)
    target = torch.randint(0, 2, (2, 5, 6))
    target[0, 0, 0] = 255
    teacher = torch.randn(2, 2, 5, 6).mul(3).softmax(1)
    loss = busseg_ops.confidence_masked_cross_entropy(logits, target, teacher, threshold=0.9)
    keep = (teacher.max(1).values >= 0.9) & (target != 255)
    manual = (
        sum(F.cross_entropy(logits[b : b + 1, :, i, j], target[b : b + 1, i, j]) for b, i, j in keep.nonzero().tolist())
        / (target != 255).sum()
    )
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert logits.grad[~keep[:, None].expand_as(logits)].abs().max() == 0


def test_entropy_filtered_cross_entropy_drops_most_uncertain():
    logits = torch.randn(2, 2, 4, 5)
    target = torch.randint(0, 2, (2, 4, 5))
    teacher = torch.randn(2, 2, 4, 5).mul(2).softmax(1)
    loss = busseg_ops.entropy_filtered_cross_entropy(logits, target, teacher, drop_percent=25)
    entropy = -(teacher * torch.log(teacher + 1e-10)).sum(1).flatten()
    kept = entropy.argsort()[:30]  # 40 pixels, the 10 most uncertain dropped
    ce = F.cross_entropy(logits, target, reduction="none").flatten()
    torch.testing.assert_close(loss, ce[kept].mean())
    with pytest.raises(ValueError, match="drop_percent"):
        busseg_ops.entropy_filtered_cross_entropy(logits, target, teacher, drop_percent=100)
    with pytest.raises(ValueError, match="target must be"):
        busseg_ops.entropy_filtered_cross_entropy(logits, target[:, :3], teacher)


def test_reliable_hard_pixels_eq10_13():
    B, H, W = 2, 16, 16
    pseudo = torch.randint(0, 2, (B, H, W))
    argmax = torch.where(torch.rand(B, H, W) < 0.7, pseudo, 1 - pseudo)
    hard = torch.rand(B, 4, 4)
    out = busseg_ops.reliable_hard_pixels(pseudo, argmax, hard, 3, (8, 8))
    assert out.mask.shape == (B, 8, 8) and out.labels.dtype == torch.int64
    lab = pseudo[:, ::2, ::2]
    torch.testing.assert_close(out.labels, lab)
    top = torch.zeros(B, 16, dtype=torch.bool).scatter_(1, hard.flatten(1).topk(3, 1).indices, True)
    top = top.view(B, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(out.hard, top)
    assert torch.equal(out.mask, top & (lab == argmax[:, ::2, ::2]))
    with pytest.raises(ValueError, match="k must be <= the number of patches 16"):
        busseg_ops.reliable_hard_pixels(pseudo, argmax, hard, 17, (8, 8))
