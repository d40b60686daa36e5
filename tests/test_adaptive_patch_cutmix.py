"""adaptive_patch_cutmix (PH-Net Eq. 5-7), cutmix_patch_mask and shield_count: the op contracts of
the gather and of the mask, the mask's distribution (shielded patches, mixed share, uniform
choice), its generator, and every path of the CPU and CUDA gathers."""

import pytest
import torch
from conftest import devices, torch_threads
from hypothesis import strategies as st
from op_contract import OpContract, RawSample, bad

import busseg_ops
from busseg_ops import adaptive_patch_cutmix, cutmix_patch_mask
from busseg_ops.ops.adaptive_patch_cutmix import MASK_OP, OP
from busseg_ops.reference.adaptive_patch_cutmix import adaptive_patch_cutmix as reference_gather

_ops = torch.ops.busseg


def cutmix_inputs(B, H, W, device="cpu"):
    image = torch.randn(B, 3, H, W, device=device)
    label = torch.randint(0, 2, (B, H, W), device=device)
    conf = torch.rand(B, H, W, device=device)
    return [image, label, conf]


def expand(mask, H, W):
    return mask.repeat_interleave(H // mask.shape[1], 1).repeat_interleave(W // mask.shape[2], 2)


def _raw(tensors=None, mask=None):
    tensors = [torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)] if tensors is None else tensors
    mask = torch.rand(2, 2, 2) > 0.5 if mask is None else mask
    return lambda: _ops.adaptive_patch_cutmix(tensors, mask)


class TestAdaptivePatchCutmix(OpContract):
    op = OP
    exact = True
    gradcheck_backends = ()
    compile_backends = ("cpu",)
    cases = [(B, H, W, N, 2, (0.3, 0.7)) for B, H, W, N in [(4, 16, 16, 4), (3, 15, 9, 3), (2, 8, 12, (2, 3))]]

    def make_inputs(self, case, device):
        B, H, W, N, k, mix_range = case
        nh, nw = (N, N) if isinstance(N, int) else N
        return cutmix_inputs(B, H, W, device), torch.rand(B, nh, nw, device=device), k, mix_range

    def call(self, tensors, hard, k, mix_range):
        g = torch.Generator(device=hard.device).manual_seed(7)
        return adaptive_patch_cutmix(tensors, hard, k, mix_range, generator=g)

    def check_reference(self, case, inputs, expected):
        tensors, hard, k, (low, _) = inputs
        mixed, mask = expected
        H, W = tensors[0].shape[-2:]
        keep = expand(mask, H, W)
        nxt = [t.roll(-1, 0) for t in tensors]
        assert torch.equal(mixed[0], torch.where(keep[:, None], tensors[0], nxt[0]))
        for m, t, n in zip(mixed[1:], tensors[1:], nxt[1:]):  # labels and confidences: the same mask
            assert torch.equal(m, torch.where(keep, t, n))
            assert m.dtype == t.dtype
        # the k hardest patches of every image are shielded
        top = hard.flatten(1).topk(k, 1).indices
        assert mask.flatten(1).gather(1, top).all()
        n = hard[0].numel()
        if k < n and low * n >= 0.5:
            assert (~mask).any()  # something was mixed (n >= round(low N²) >= 1)

    def property_case(self):
        grid = st.tuples(st.integers(2, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3))
        share = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted).map(tuple)
        return st.tuples(grid, st.floats(0, 1), share).map(
            lambda c: (
                c[0][0],
                c[0][1] * c[0][3],
                c[0][2] * c[0][4],
                (c[0][3], c[0][4]),
                int(c[1] * c[0][3] * c[0][4]),  # shield_count in [0, N²]
                c[2],
            )
        )

    def compile_inputs(self):
        tensors = [torch.randn(3, 2, 6, 8), torch.randint(0, 3, (3, 6, 8)), torch.rand(3, 6, 8, dtype=torch.float64)]
        mask = torch.rand(3, 2, 4) > 0.5
        return (lambda ts, m: _ops.adaptive_patch_cutmix(ts, m)), (tensors, mask)

    def compile_expected(self, fn, inputs):
        return reference_gather(*inputs)

    def layout_inputs(self):
        image = torch.randn(3, 4, 8, 8)
        label = torch.randint(0, 2, (3, 8, 8))
        return [image, label], torch.rand(3, 2, 2), 1, (0.1, 0.5)

    def bad_input_args(self):
        return cutmix_inputs(2, 8, 8), torch.rand(2, 4, 4)

    bad_inputs = [
        bad(lambda t, h: adaptive_patch_cutmix(t, h, 17), ValueError, r"shield_count must be <= N² = 16"),
        bad(lambda t, h: adaptive_patch_cutmix(t, h[:, :3], 1), ValueError, "grid 3×4 does not divide"),
        bad(lambda t, h: adaptive_patch_cutmix([t[0], t[1][:1]], h, 1), ValueError, r"tensors\[1\]"),
        bad(lambda t, h: adaptive_patch_cutmix(t[0], h, 1), TypeError, "tensors must be a non-empty list"),
        bad(lambda t, h: adaptive_patch_cutmix([], h, 1), TypeError, "tensors must be a non-empty list"),
        bad(lambda t, h: adaptive_patch_cutmix(t, h, 1, (0.6, 0.2)), ValueError, "mix_range"),
        bad(lambda t, h: adaptive_patch_cutmix(t, h[0], 1), ValueError, "hardness must have 3 dims"),
        bad(lambda t, h: adaptive_patch_cutmix([t[0][:, :, :0]], h, 1), ValueError, r"tensors\[0\] is empty"),
        bad(lambda t, h: busseg_ops.shield_count(0.3, 1.5, 16), ValueError, "progress"),
        bad(lambda t, h: adaptive_patch_cutmix(t, h, 2**64), ValueError, "shield_count must be <= "),
        bad(lambda t, h: adaptive_patch_cutmix(t, h, 1, (0.2, float("nan"))), ValueError, "mix_range"),
        bad(lambda t, h: adaptive_patch_cutmix(t, h, 1, generator=1), TypeError, "generator must be"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h, 17), ValueError, r"shield_count must be <= N² = 16"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h, -1), ValueError, "shield_count must be >= 0"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h, 1.5), TypeError, "shield_count must be an int"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h, 1, (0.5, 0.2)), ValueError, "mix_range"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h, 1, (0.2, 1.5)), ValueError, "mix_range"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h, 1, 0.5), ValueError, "mix_range"),
        bad(lambda t, h: busseg_ops.cutmix_patch_mask(h[0], 1), ValueError, "hardness must have 3 dims"),
    ]

    raw_bad_inputs = [
        bad(_raw(tensors=[]), ValueError, "tensors must not be empty"),
        bad(_raw(mask=torch.ones(2, 2, 2)), TypeError, "patch_mask must be Bool"),
        bad(_raw(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"patch_mask must be \(B, Nh, Nw\)"),
        bad(_raw(mask=torch.ones(3, 2, 2, dtype=torch.bool)), ValueError, "every tensor must be"),
        bad(_raw(mask=torch.ones(2, 3, 3, dtype=torch.bool)), ValueError, "patch grid must divide"),
        bad(_raw(tensors=[torch.rand(8)]), ValueError, r"tensors\[0\] must be \(B, ..., H, W\)"),
        bad(_raw(tensors=[torch.rand(2, 8, 8), torch.rand(2, 8, 7)]), ValueError, "every tensor must be"),
        bad(_raw(tensors=[torch.rand(2, 8, 8), torch.rand(2, 8, 8, device="meta")]), ValueError, "device"),
    ]

    def raw_samples(self):
        tensors = [torch.randn(3, 2, 6, 8), torch.randint(0, 3, (3, 6, 8)), torch.rand(3, 6, 8, dtype=torch.float64)]
        mask = torch.rand(3, 2, 4) > 0.5
        return [RawSample(OP.name, (tensors, mask), free={(0, "dim", 1), (0, "dtype"), (1, "dim", 1)})]


def _raw_mask(hardness=None, uniforms=None, k=1, low=0.1, high=0.5):
    hardness = torch.rand(2, 3, 4) if hardness is None else hardness
    uniforms = torch.rand(2, 13) if uniforms is None else uniforms
    return lambda: _ops.cutmix_patch_mask(hardness, uniforms, k, low, high)


def shielded_patches(hardness, k):
    """(B, N) bool: the k hardest patches of each image (NaN first, ties to the smaller index)."""
    flat = hardness.flatten(1)
    hardest = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, hardest, True)


MASK_CASES = [  # B, Nh, Nw, k, mix_range, hardness
    (4, 4, 4, 2, (0.3, 0.7), "random"),
    (3, 5, 7, 0, (0.1, 0.5), "random"),  # nothing shielded
    (2, 3, 3, 9, (0.1, 0.5), "random"),  # everything shielded: nothing replaced
    (5, 6, 4, 7, (0.0, 1.0), "ties"),  # ties in the hardness, n capped at N² - k
    (3, 4, 4, 3, (1.0, 1.0), "nan"),  # NaN hardness (hardest), every unshielded patch replaced
    (1, 16, 16, 38, (0.1, 0.5), "random"),  # B = 1, PH-Net's grid
    (2, 64, 48, 100, (0.2, 0.4), "ties"),  # 3072 patches: the CUDA sort in global scratch
]


class TestCutmixPatchMask(OpContract):
    op = MASK_OP
    exact = True
    gradcheck_backends = ()
    compile_backends = ("cpu", "reference")
    cases = [(c, dtype) for c in MASK_CASES for dtype in (torch.float32,)] + [
        (MASK_CASES[3], torch.float64),
        (MASK_CASES[3], torch.float16),
        (MASK_CASES[0], torch.bfloat16),
    ]

    def make_inputs(self, case, device):
        (B, Nh, Nw, k, mix_range, kind), dtype = case
        hard = torch.rand(B, Nh, Nw, device=device)
        if kind == "ties":
            hard = (hard * 4).floor() / 4
        elif kind == "nan":
            hard.view(B, -1)[:, Nh * Nw // 2] = float("nan")
        return hard.to(dtype), k, mix_range

    def call(self, hard, k, mix_range):
        return cutmix_patch_mask(hard, k, mix_range, torch.Generator(device=hard.device).manual_seed(11))

    def check_reference(self, case, inputs, expected):
        hard, k, (low, high) = inputs
        B, Nh, Nw = hard.shape
        N = Nh * Nw
        assert expected.dtype == torch.bool and expected.shape == (B, Nh, Nw)
        kept = expected.flatten(1)
        assert kept[shielded_patches(hard, k)].all()
        replaced = (~kept).sum(1)
        assert (replaced >= min(round(low * N), N - k)).all() and (replaced <= min(round(high * N), N - k)).all()

    def property_case(self):
        grid = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
        share = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted).map(tuple)
        kind = st.sampled_from(["random", "ties", "nan"])
        return st.tuples(grid, st.floats(0, 1), share, kind).map(
            lambda c: ((*c[0], int(c[1] * c[0][1] * c[0][2]), c[2], c[3]), torch.float32)
        )

    def compile_inputs(self):
        hard, uniforms = torch.rand(3, 4, 5), torch.rand(3, 21)
        return (lambda h, u: _ops.cutmix_patch_mask(h, u, 4, 0.1, 0.5)), (hard, uniforms)

    def nan_inputs(self):
        hard = torch.rand(2, 3, 3)
        hard[0, 2, 2] = float("nan")
        return hard, 1, (1.0, 1.0)

    def check_nan(self, out, inputs):
        assert out[0, 2, 2] and out[0].sum() == 1  # NaN counts as the hardest: shielded

    def layout_inputs(self):
        return torch.rand(3, 4, 6), 5, (0.2, 0.6)

    def bad_input_args(self):
        return (torch.rand(2, 4, 4),)

    bad_inputs = [
        bad(lambda h: cutmix_patch_mask(h, 17), ValueError, r"shield_count must be <= N² = 16"),
        bad(lambda h: cutmix_patch_mask(h, -1), ValueError, "shield_count must be >= 0"),
        bad(lambda h: cutmix_patch_mask(h, 1.5), TypeError, "shield_count must be an int"),
        bad(lambda h: cutmix_patch_mask(h, 1, (0.5, 0.2)), ValueError, "mix_range"),
        bad(lambda h: cutmix_patch_mask(h, 1, (0.2, 1.5)), ValueError, "mix_range"),
        bad(lambda h: cutmix_patch_mask(h, 1, 0.5), ValueError, "mix_range"),
        bad(lambda h: cutmix_patch_mask(h[0], 1), ValueError, "hardness must have 3 dims"),
        bad(lambda h: cutmix_patch_mask(h.long(), 1), TypeError, "hardness must be one of float32"),
        bad(lambda h: cutmix_patch_mask(h[:, :0], 0), ValueError, "hardness is empty"),
        bad(lambda h: cutmix_patch_mask(h, 1, generator=3), TypeError, "generator must be a torch.Generator"),
    ]

    raw_bad_inputs = [
        bad(_raw_mask(uniforms=torch.rand(2, 12)), ValueError, r"uniforms must be \(B, 1 \+ Nh \* Nw\)"),
        bad(_raw_mask(uniforms=torch.rand(3, 13)), ValueError, r"uniforms must be \(B, 1 \+ Nh \* Nw\)"),
        bad(_raw_mask(uniforms=torch.ones(2, 13, dtype=torch.int32)), TypeError, "uniforms must be float32"),
        bad(_raw_mask(uniforms=torch.rand(2, 13, device="meta")), ValueError, "uniforms must be on the device"),
        bad(_raw_mask(hardness=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "hardness must be float32"),
        bad(_raw_mask(hardness=torch.rand(2, 12)), ValueError, "hardness must have 3 dims"),
        bad(_raw_mask(hardness=torch.rand(2, 0, 4), uniforms=torch.rand(2, 1)), ValueError, r"1 to 2\^30 patches"),
        bad(_raw_mask(k=13), ValueError, r"shield_count must be in \[0, 12\]"),
        bad(_raw_mask(k=-1), ValueError, "shield_count must be in"),
        bad(_raw_mask(low=0.6, high=0.5), ValueError, "0 <= low <= high <= 1"),
        bad(_raw_mask(low=-0.1), ValueError, "0 <= low <= high <= 1"),
        bad(_raw_mask(high=float("nan")), ValueError, "0 <= low <= high <= 1"),
    ]

    def raw_samples(self):
        hard, uniforms = torch.rand(3, 2, 4, dtype=torch.float64), torch.rand(3, 9)
        return [RawSample(MASK_OP.name, (hard, uniforms, 2, 0.1, 0.5), free={(2, "zero")})]


def mask_backends(device):
    return [b for b in MASK_OP.backends if b in busseg_ops.available_backends(device)]


@pytest.mark.parametrize("device", devices())
def test_cutmix_share_respects_range_and_cap(device):
    B, N = 64, 4
    hard = torch.rand(B, N, N, device=device)
    for backend in mask_backends(device):
        g = torch.Generator(device=device).manual_seed(0)
        with busseg_ops.use_backend(backend):
            mask = cutmix_patch_mask(hard, 3, (0.25, 0.5), g)
            replaced = (~mask).flatten(1).sum(1)
            assert replaced.min() >= 4 and replaced.max() <= 8, backend
            assert replaced.unique().numel() > 1, backend  # the share is drawn per image
            capped = cutmix_patch_mask(hard, 14, (0.9, 1.0), g)
            assert torch.all((~capped).flatten(1).sum(1) == 2), backend  # n capped at N² − k


@pytest.mark.parametrize("device", devices())
def test_cutmix_mask_distribution(device):
    """Over 4000 images of PH-Net's 16 x 16 grid with k = 38: the shielded patches are never
    replaced; n = round(U(0.1, 0.5) * 256) spans its range with the right mean; every unshielded
    patch is replaced equally often (the choice is uniform), within 5 standard deviations."""
    B, N, k, (low, high) = 4000, 16, 38, (0.1, 0.5)
    hard = torch.rand(B, N, N, device=device)
    shield = shielded_patches(hard, k)
    for backend in mask_backends(device):
        with busseg_ops.use_backend(backend):
            mask = cutmix_patch_mask(hard, k, (low, high), torch.Generator(device=device).manual_seed(5)).flatten(1)
        assert mask[shield].all(), backend
        n = (~mask).sum(1).double()
        lo, hi = round(low * N * N), round(high * N * N)
        assert n.min() == lo and n.max() == hi, backend  # both ends reached (each about 1/100)
        expected_mean, spread = (lo + hi) / 2, (hi - lo) / 12**0.5
        assert abs(n.mean() - expected_mean) < 5 * spread / B**0.5, backend
        # per-image position of each patch among the unshielded ones: replaced with p = n / 218
        p = n / (N * N - k)
        hits = ((~mask) & ~shield).double()
        expected = (p[:, None] * (~shield).double()).sum(0)
        var = (p * (1 - p))[:, None].mul((~shield).double()).sum(0)
        unshielded = expected > 0
        z = (hits.sum(0) - expected)[unshielded] / var[unshielded].sqrt()
        assert z.abs().max() < 5, (backend, z.abs().max())


@pytest.mark.parametrize("device", devices())
def test_cutmix_mask_generator_determinism(device):
    hard = torch.rand(6, 8, 8, device=device)
    for backend in mask_backends(device):
        with busseg_ops.use_backend(backend):
            draws = [
                cutmix_patch_mask(hard, 5, generator=torch.Generator(device=device).manual_seed(s)) for s in (1, 1, 2)
            ]
        assert torch.equal(draws[0], draws[1]), backend  # same seed, same mask
        assert not torch.equal(draws[0], draws[2]), backend  # another seed, another mask


def test_cutmix_cpu_mask_keeps_its_draws():
    """On the CPU the draws are those of the shares, then the keys (torch.rand twice): the mask a
    seeded CPU generator gives is the one the plain torch formulation gives."""
    hard = torch.rand(5, 6, 6)
    g = torch.Generator().manual_seed(3)
    share, keys = torch.rand(5, generator=g), torch.rand(5, 36, generator=g)
    n = torch.floor((0.1 + (0.5 - 0.1) * share) * 36 + 0.5).long().clamp(max=36 - 4)
    keys[shielded_patches(hard, 4)] = 2.0
    rank = torch.empty(5, 36, dtype=torch.long).scatter_(1, keys.argsort(1), torch.arange(36).expand(5, -1))
    expected = (rank >= n[:, None]).view(5, 6, 6)
    for backend in ("cpu", "reference"):
        with busseg_ops.use_backend(backend):
            assert torch.equal(cutmix_patch_mask(hard, 4, (0.1, 0.5), torch.Generator().manual_seed(3)), expected)


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


def test_shield_count_eq5():
    assert busseg_ops.shield_count(0.3, 0.0, 256) == 0
    assert busseg_ops.shield_count(0.3, 0.5, 256) == 38  # floor(0.3 * 0.5 * 256) = floor(38.4)
    assert busseg_ops.shield_count(0.3, 1.0, 100) == 30


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
    with torch_threads(threads):
        out = _ops.adaptive_patch_cutmix(tensors, mask)
    for a, b in zip(out, reference_gather(tensors, mask)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_cutmix_cpu_empty_maps():
    for shape in ((2, 3, 0, 4), (2, 3, 4, 0)):
        out = _ops.adaptive_patch_cutmix([torch.rand(shape)], torch.ones(2, 1, 2, dtype=torch.bool))
        assert out[0].shape == shape


# Tensors that reach every path of the gathers: element sizes 1 to 8 bytes, a channel dimension,
# odd widths (CUDA: chunks narrower than 16 bytes), a pointer off a 16-byte boundary, nine tensors
# (two CUDA launches), B = 1 (an image mixed with itself).
def gather_tensors(B, H, W, device):
    tensors = [
        torch.randint(0, 255, (B, H, W), dtype=torch.uint8, device=device),
        torch.randn(B, 2, H, W, dtype=torch.float64, device=device),
        torch.randint(-9, 9, (B, 1, 3, H, W), dtype=torch.int16, device=device),
        torch.randn(B, 3, H, W, device=device),
        torch.randn(B, H, W, device=device).half(),
        torch.randint(0, 2, (B, H, W), device=device),
        torch.rand(B, H, W, device=device) > 0.5,
        torch.randn(B, H, W, device=device).bfloat16(),
    ]
    offset = torch.empty(B * H * W + 1, device=device)[1:].view(B, H, W)  # 4 bytes past alignment
    offset.copy_(torch.randn(B, H, W, device=device))
    return tensors + [offset]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "B,H,W,grid", [(3, 32, 64, (4, 8)), (2, 12, 20, (4, 5)), (4, 16, 15, (2, 3)), (1, 8, 8, (2, 2))]
)
def test_gather_every_path(device, B, H, W, grid):
    tensors = gather_tensors(B, H, W, device)
    mask = torch.rand(B, *grid, device=device) > 0.5
    expected = reference_gather(tensors, mask)
    for backend in [b for b in OP.backends if b != "reference" and b in busseg_ops.available_backends(device)]:
        with busseg_ops.use_backend(backend):
            out = _ops.adaptive_patch_cutmix(tensors, mask)
        for i, (a, e) in enumerate(zip(out, expected)):
            assert a.dtype == e.dtype and torch.equal(a, e), f"{backend} tensor {i}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hardness_and_cutmix_capture_in_a_graph():
    """The GPU path draws its uniforms on the device from the default generator and never waits
    for the host: hardness and cutmix capture into a CUDA graph, and each replay draws anew."""
    B, S, N, k = 8, 128, 16, 38
    logits = torch.randn(B, 2, S, S, device="cuda")
    image = torch.randn(B, 3, S, S, device="cuda")
    label = torch.randint(0, 2, (B, S, S), device="cuda")

    def step():
        hard = busseg_ops.patch_entropy_hardness(logits, num_patches=N, from_logits=True)
        return adaptive_patch_cutmix([image, label], hard, k)

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (lazy initialisation)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (mixed_image, mixed_label), mask = step()
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(mask.clone())
        keep = expand(mask, S, S)
        assert torch.equal(mixed_image, torch.where(keep[:, None], image, image.roll(-1, 0)))
        assert torch.equal(mixed_label, torch.where(keep, label, label.roll(-1, 0)))
        hard = busseg_ops.patch_entropy_hardness(logits, num_patches=N, from_logits=True)
        assert mask.flatten(1)[shielded_patches(hard, k)].all()
    assert not torch.equal(masks[0], masks[1])  # the generator's offset advanced between replays
