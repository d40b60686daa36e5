"""adaptive_patch_cutmix (PH-Net Eq. 5-7), cutmix_patch_mask and shield_count: the op contract,
the mask (shielded patches, mixed share), and the CPU gather's byte split."""

import pytest
import torch
from hypothesis import strategies as st
from op_contract import OpContract, RawSample, bad

import busseg_ops
from busseg_ops import adaptive_patch_cutmix
from busseg_ops.ops.adaptive_patch_cutmix import OP
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
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _ops.adaptive_patch_cutmix(tensors, mask)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(out, reference_gather(tensors, mask)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_cutmix_cpu_empty_maps():
    for shape in ((2, 3, 0, 4), (2, 3, 4, 0)):
        out = _ops.adaptive_patch_cutmix([torch.rand(shape)], torch.ones(2, 1, 2, dtype=torch.bool))
        assert out[0].shape == shape
