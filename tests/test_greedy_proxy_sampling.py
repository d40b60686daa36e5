"""Cross-layer relation alignment (SPEC §2): proxy sampling, index mapping, the alignment loss;
every backend against the reference, the reference against literal oracles."""

import os
import sys

import pytest
import torch
from conftest import backends, devices, tolerance

import busseg_ops
from busseg_ops import (
    cross_layer_alignment_loss as cra_loss,
)
from busseg_ops import (
    gather_proxies,
    map_proxy_indices,
    sample_proxies,
)
from busseg_ops import (
    greedy_proxy_sampling as greedy,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def sampling_backends(device="cpu"):
    return backends(device, exclude=("triton",))  # greedy sampling has no Triton version


def run_greedy(backend, feat, num_proxies, **kw):
    with busseg_ops.use_backend(backend):
        return greedy(feat, num_proxies, **kw)


def brute_force_greedy(feat, first, num_proxies, scale):
    """SPEC §2.1 literally: the whole (HW, HW) map, score(j) = max over t of c_t(j) recomputed
    from scratch every step, ties to the smallest index (NaN-free inputs)."""
    B, C, H, W = feat.shape
    out = []
    for b in range(B):
        f = feat[b].reshape(C, H * W).double()
        S = scale * f.T @ f
        chosen = [int(first[b])]
        while len(chosen) < num_proxies:
            c = torch.cumsum(S[chosen], 0)  # c_t for t = 1..m
            score = c.max(0).values
            score[chosen] = float("inf")
            chosen.append(int((score == score.min()).nonzero()[0]))
        out.append(chosen)
    return torch.tensor(out)


GREEDY_CASES = [  # B, C, H, W, M
    (1, 3, 5, 7, 1),
    (2, 8, 9, 9, 20),
    (3, 5, 7, 4, 28),  # M = HW: a permutation
    (4, 16, 6, 11, 17),
    (2, 1, 3, 3, 9),  # C = 1
]


@pytest.mark.parametrize("case", GREEDY_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_greedy_reference_matches_brute_force(case, relu):
    B, C, H, W, M = case
    feat = torch.randn(B, C, H, W, dtype=torch.float64)
    feat = feat.relu() if relu else feat
    first = torch.randint(0, H * W, (B,))
    idx = run_greedy("reference", feat, M, first=first)
    torch.testing.assert_close(idx, brute_force_greedy(feat, first, M, C**-0.5), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", GREEDY_CASES)
@pytest.mark.parametrize("dtype,relu", [(torch.float64, False), (torch.float64, True), (torch.float32, False)])
def test_greedy_backends_match_reference(device, case, dtype, relu):
    B, C, H, W, M = case
    feat = torch.randn(B, C, H, W, dtype=dtype, device=device)
    feat = feat.relu() if relu else feat
    first = torch.randint(0, H * W, (B,), device=device)
    expected = run_greedy("reference", feat, M, first=first, scale=0.7)
    assert expected.dtype == torch.int64 and expected.shape == (B, M)
    assert all(len(set(row.tolist())) == M for row in expected)
    for backend in sampling_backends(device):
        for threads in (1, 2):  # images in parallel, and pixels of one image in parallel
            torch.set_num_threads(threads)
            try:
                got = run_greedy(backend, feat, M, first=first, scale=0.7)
            finally:
                torch.set_num_threads(2)
            assert torch.equal(got, expected), f"{backend} with {threads} threads"


@pytest.mark.parametrize("backend", sampling_backends() + ["reference"])
def test_greedy_ties_go_to_the_smallest_index(backend):
    # identical features: every unchosen pixel ties at every step
    feat = torch.ones(2, 3, 4, 5)
    idx = run_greedy(backend, feat, 7, first=torch.tensor([6, 0]))
    assert idx.tolist() == [[6, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]
    # small integer features, scale 1: exact sums with many ties; negative entries included
    feat = torch.randint(-2, 3, (3, 2, 5, 5)).double()
    first = torch.tensor([0, 12, 24])
    got = run_greedy(backend, feat, 25, first=first, scale=1.0)
    assert torch.equal(got, brute_force_greedy(feat, first, 25, 1.0))


def test_running_max_is_not_the_last_cumulative_sum():
    # After proxies 0 and 1, pixel 3 has the smallest last cumulative similarity c_2 but pixel 4
    # the smallest running max max(c_1, c_2): SPEC §2.1 picks 4.
    f = torch.tensor([[1.0, 0.0], [-3.0, -1.0], [-2.0, -1.0], [3.0, 0.0], [1.0, 2.0]])
    feat = f.T.reshape(1, 2, 1, 5).double()
    first = torch.tensor([0])
    S = f @ f.T
    assert (S[0] + S[1])[2:].argmin() + 2 == 3
    for backend in sampling_backends() + ["reference"]:
        idx = run_greedy(backend, feat, 4, first=first, scale=1.0)
        assert idx[0, :3].tolist() == [0, 1, 4], backend
        assert torch.equal(idx, brute_force_greedy(feat, first, 4, 1.0))


@pytest.mark.parametrize("backend", sampling_backends() + ["reference"])
def test_greedy_first_from_label_and_generator(backend):
    B, H, W = 4, 6, 7
    feat = torch.randn(B, 5, H, W)
    label = torch.zeros(B, H, W, dtype=torch.long)
    label[0, 2:4, 3:6] = 1
    label[1, 0, 0] = 1
    label[3] = 1  # image 2 stays background: uniform first pixel
    with busseg_ops.use_backend(backend):
        draws = [greedy(feat, 5, label=label, generator=torch.Generator().manual_seed(s)) for s in range(12)]
        again = greedy(feat, 5, label=label, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, draws[3])
    firsts = torch.stack([d[:, 0] for d in draws])  # (draws, B)
    fg = label.flatten(1)
    for b in (0, 1, 3):
        assert bool(fg[b, firsts[:, b]].all()), "first proxy must be a foreground pixel"
    assert firsts[:, 1].unique().tolist() == [0]  # the single foreground pixel
    assert len(firsts[:, 0].unique()) > 1 and len(firsts[:, 2].unique()) > 1  # random draws
    no_label = [greedy(feat, 3, generator=torch.Generator().manual_seed(s))[:, 0] for s in (0, 0, 1)]
    assert torch.equal(no_label[0], no_label[1])


@pytest.mark.parametrize("backend", sampling_backends())
def test_greedy_layouts_and_nan(backend):
    feat = torch.randn(2, 6, 7, 9)
    first = torch.tensor([5, 40])
    expected = run_greedy(backend, feat, 12, first=first)
    assert torch.equal(run_greedy(backend, feat.to(memory_format=torch.channels_last), 12, first=first), expected)
    wide = torch.randn(2, 12, 7, 18)
    wide[:, ::2, :, ::2] = feat
    assert torch.equal(run_greedy(backend, wide[:, ::2, :, ::2], 12, first=first), expected)
    feat[0, 2, 3, 4] = float("nan")  # pixel 31: NaN similarities count as +inf, never a hang
    got = run_greedy(backend, feat, 63, first=first)
    assert torch.equal(got, run_greedy("reference", feat, 63, first=first))
    assert sorted(got[0].tolist()) == list(range(63)) and got[0, -1] == 31  # NaN pixel last


def near_copies(B, C, H, W, spread, groups=4):
    """Float features whose pixels are near-copies of a few vectors: differences (spread) at or
    below half precision (2^-11 relative) but far above float's."""
    base = torch.randn(B, C, groups).relu() + 0.1
    pick = torch.randint(0, groups, (H * W,))
    return (base[:, :, pick] + spread * torch.randn(B, C, H * W)).reshape(B, C, H, W)


@pytest.mark.parametrize(
    "case", [(2, 16, 9, 11, 40, 1e-5), (1, 37, 13, 10, 130, 1e-4), (3, 64, 5, 7, 35, 1e-3), (1, 5, 7, 9, 20, 1e-4)]
)
def test_float_sampling_resolves_differences_below_half_precision(case):
    # The cpu backend screens float images through a half copy and re-scores the pixels it
    # cannot rule out exactly: its choice must be the exact (double) arg-min.
    B, C, H, W, M, spread = case
    feat = near_copies(B, C, H, W, spread)
    first = torch.randint(0, H * W, (B,))
    expected = run_greedy("reference", feat.double(), M, first=first)
    rounded = run_greedy("reference", feat.half().double(), M, first=first)
    assert not torch.equal(rounded, expected), "the half copy alone must not suffice here"
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            got = run_greedy("cpu", feat, M, first=first)
        finally:
            torch.set_num_threads(2)
        assert torch.equal(got, expected), f"{threads} threads"


@pytest.mark.parametrize("magnitude", [1e-6, 1e5])
def test_float_sampling_beyond_the_half_normal_range(magnitude):
    # 1e-6: subnormal in half (absolute rounding); 1e5: beyond half, the plain float loop runs.
    feat = torch.randn(2, 24, 9, 8) * magnitude
    first = torch.tensor([3, 70])
    expected = run_greedy("reference", feat.double(), 30, first=first)
    assert torch.equal(run_greedy("cpu", feat, 30, first=first), expected)


def test_greedy_memory_at_128x128():
    from peak_memory import peak_extra_mib

    setup = """
import torch, busseg_ops
feat = torch.randn(1, 256, 128, 128)
first = torch.tensor([0])
"""
    mib = peak_extra_mib(setup, "busseg_ops.greedy_proxy_sampling(feat, 64, first=first)")
    assert mib < 64, f"greedy sampling at 128x128 added {mib:.0f} MiB (the HW x HW map is 1024)"


# The CUDA greedy kernel runs an image on one block or on several cooperating blocks (grid
# barrier per step); BUSSEG_GREEDY_BLOCKS_PER_IMAGE forces the split (0: the launcher's choice).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPLITS = [1, 2, 13, 0]


def run_greedy_split(monkeypatch, blocks, feat, num_proxies, **kw):
    monkeypatch.setenv("BUSSEG_GREEDY_BLOCKS_PER_IMAGE", str(blocks))
    return run_greedy("cuda", feat, num_proxies, **kw)


def exact_features(shape, dtype=torch.float32):
    """Entries in {-1, 0, 1}: with scale 1/2 every similarity sum is exact in float32 (|c| < 2^22)
    whatever the summation order, so all backends must agree exactly; many exact ties."""
    return torch.randint(-1, 2, shape, device="cuda").to(dtype)


@needs_cuda
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("H,W", [(127, 129), (65, 65)])
@pytest.mark.parametrize("C", [1, 7, 256])
@pytest.mark.parametrize("M", [1, 5, 64, "HW"])
def test_cuda_greedy_splits_match_reference(monkeypatch, B, H, W, C, M):
    M = H * W if M == "HW" else M
    feat = exact_features((B, C, H, W))
    first = torch.randint(0, H * W, (B,), device="cuda")
    expected = run_greedy("reference", feat, M, first=first, scale=0.5)
    # 1 or 2 blocks per image take minutes for all 16383 steps at 127x129: finer splits only
    for blocks in SPLITS[2:] if M == 127 * 129 else SPLITS:
        got = run_greedy_split(monkeypatch, blocks, feat, M, first=first, scale=0.5)
        assert torch.equal(got, expected), f"{blocks} blocks per image"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cuda_greedy_splits_dtypes(monkeypatch, dtype):
    shape = (2, 7, 65, 65)
    feat = torch.randn(shape, device="cuda", dtype=dtype) if dtype == torch.float64 else exact_features(shape, dtype)
    first = torch.tensor([0, 4224], device="cuda")
    expected = run_greedy("reference", feat, 64, first=first, scale=0.5)
    for blocks in SPLITS:
        assert torch.equal(run_greedy_split(monkeypatch, blocks, feat, 64, first=first, scale=0.5), expected), (
            f"{blocks} blocks per image"
        )


@needs_cuda
def test_cuda_greedy_splits_agree_bitwise(monkeypatch):
    # float32 sums round, but every split does the same arithmetic per pixel: same proxies
    feat = torch.randn(2, 256, 127, 129, device="cuda")
    first = torch.tensor([3, 16000], device="cuda")
    runs = [run_greedy_split(monkeypatch, blocks, feat, 64, first=first) for blocks in SPLITS]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    many = exact_features((200, 7, 65, 65))  # a batch larger than the SM count
    first = torch.randint(0, 65 * 65, (200,), device="cuda")
    assert torch.equal(
        run_greedy_split(monkeypatch, 0, many, 5, first=first, scale=0.5),
        run_greedy("reference", many, 5, first=first, scale=0.5),
    )


@needs_cuda
@pytest.mark.parametrize("blocks", SPLITS + [25])  # 25: one pixel per block
def test_cuda_greedy_split_ties(monkeypatch, blocks):
    feat = torch.ones(2, 3, 5, 5, device="cuda")  # every unchosen pixel ties at every step
    idx = run_greedy_split(monkeypatch, blocks, feat, 7, first=torch.tensor([6, 0], device="cuda"))
    assert idx.tolist() == [[6, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]
    feat = torch.randint(-2, 3, (3, 2, 5, 5)).double()  # small integers, scale 1: exact sums
    first = torch.tensor([0, 12, 24])
    got = run_greedy_split(monkeypatch, blocks, feat.cuda(), 25, first=first.cuda(), scale=1.0)
    assert torch.equal(got.cpu(), brute_force_greedy(feat, first, 25, 1.0))
    big = torch.ones(2, 3, 65, 65, device="cuda")
    idx = run_greedy_split(monkeypatch, min(blocks, 13), big, 300, first=torch.tensor([4000, 0], device="cuda"))
    assert idx[0].tolist() == [4000] + list(range(299)) and idx[1].tolist() == list(range(300))


@needs_cuda
@pytest.mark.parametrize("blocks", SPLITS)
def test_cuda_greedy_split_nan(monkeypatch, blocks):
    HW = 65 * 65
    feat = torch.randn(2, 7, 65, 65, device="cuda", dtype=torch.float64)
    feat[0, 3, 10, 20] = feat[0, 0, 64, 1] = float("nan")  # pixels 670 and 4161
    feat[1, 5, 0, 9] = float("nan")  # image 1 starts at NaN pixel 9: every score NaN (+inf)
    first = torch.tensor([2000, 9], device="cuda")
    got = run_greedy_split(monkeypatch, blocks, feat, HW, first=first)
    assert torch.equal(got, run_greedy("reference", feat, HW, first=first))
    assert sorted(got[0, -2:].tolist()) == [670, 4161]  # NaN pixels last
    assert got[1].tolist() == [9] + [j for j in range(HW) if j != 9]


@needs_cuda
def test_cuda_greedy_split_errors(monkeypatch):
    feat = torch.randn(1, 7, 127, 129, device="cuda")
    first = torch.tensor([0], device="cuda")
    for bad in ("two", "-1", str(127 * 129 + 1)):
        with pytest.raises(ValueError, match="BUSSEG_GREEDY_BLOCKS_PER_IMAGE"):
            run_greedy_split(monkeypatch, bad, feat, 5, first=first)
    # 16383 blocks cannot all be resident: the cooperative launch refuses, no hang
    with pytest.raises(RuntimeError, match="cra_greedy_sampling failed"):
        run_greedy_split(monkeypatch, 127 * 129, feat, 5, first=first)
    assert torch.equal(
        run_greedy_split(monkeypatch, 0, feat, 5, first=first), run_greedy("reference", feat, 5, first=first)
    )


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda f: greedy(f, 36), ValueError, r"num_proxies must be <= H\*W = 35"),
        (lambda f: greedy(f, 0), ValueError, "num_proxies must be >= 1"),
        (lambda f: greedy(f, 2.0), TypeError, "num_proxies must be an int"),
        (lambda f: greedy(f[0]), ValueError, "feat must have 4 dims"),
        (lambda f: greedy(f[:, :, :0], 1), ValueError, "feat is empty"),
        (lambda f: greedy(f.long(), 3), TypeError, "feat must be one of float32, float64"),
        (lambda f: greedy(f, 3, label=torch.ones(2, 5, 6)), ValueError, r"label must be \(B, H, W\)"),
        (lambda f: greedy(f, 3, label=torch.ones(1, 5, 7)), ValueError, r"label must be \(B, H, W\)"),
        (lambda f: greedy(f, 3, first=torch.tensor([0, 35])), ValueError, "first must hold pixel indices"),
        (lambda f: greedy(f, 3, first=torch.tensor([0])), ValueError, r"first must be \(B,\)"),
        (lambda f: greedy(f, 3, first=torch.tensor([0.0, 1.0])), TypeError, "first must be an integer"),
        (lambda f: greedy(f, 3, generator=0), TypeError, "generator must be a torch.Generator"),
        (lambda f: sample_proxies(f, 3, "grid"), ValueError, "strategy must be one of"),
        (lambda f: sample_proxies(f, 36, "random"), ValueError, r"num_proxies must be <= H\*W"),
        (lambda f: sample_proxies(f, 11, "patch"), ValueError, "num_proxies=11 cannot be laid out"),
    ],
)
def test_sampling_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 4, 5, 7))


def test_direct_sampling_op_is_checked_in_cpp():
    feat = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"num_proxies must be in \[1, H\*W = 9\]"):
        torch.ops.busseg.cra_greedy_sampling(feat, torch.tensor([0]), 10, 1.0)
    with pytest.raises(ValueError, match="first must hold pixel indices"):
        torch.ops.busseg.cra_greedy_sampling(feat, torch.tensor([9]), 3, 1.0)
    with pytest.raises(TypeError, match="first must be int64"):
        torch.ops.busseg.cra_greedy_sampling(feat, torch.tensor([0], dtype=torch.int32), 3, 1.0)


@pytest.mark.parametrize("strategy", ["random", "kmeans", "patch", "greedy"])
def test_sampling_strategies_share_the_contract(strategy):
    feat = torch.randn(3, 4, 8, 10)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    idx = sample_proxies(feat, 16, strategy, generator=gen())
    assert idx.dtype == torch.int64 and idx.shape == (3, 16)
    assert all(len(set(row.tolist())) == 16 for row in idx) and 0 <= idx.min() and idx.max() < 80
    assert torch.equal(idx, sample_proxies(feat, 16, strategy, generator=gen()))


def test_patch_strategy_takes_the_pixel_nearest_each_patch_mean():
    feat = torch.randn(2, 3, 8, 12)
    idx = sample_proxies(feat, 6, "patch")  # 2 x 3 grid of 4 x 4 patches
    for b in range(2):
        for m, j in enumerate(idx[b].tolist()):
            y0, x0 = 4 * (m // 3), 4 * (m % 3)
            patch = feat[b, :, y0 : y0 + 4, x0 : x0 + 4].reshape(3, 16)
            k = (patch - patch.mean(1, keepdim=True)).norm(dim=0).argmin().item()
            assert j == (y0 + k // 4) * 12 + x0 + k % 4


def test_kmeans_strategy_finds_one_proxy_per_cluster():
    centres = torch.randn(4, 6) * 10
    assign = torch.randperm(40) % 4
    feat = (centres[assign] + 0.01 * torch.randn(40, 6)).T.reshape(1, 6, 5, 8)
    idx = sample_proxies(feat, 4, "kmeans", generator=torch.Generator().manual_seed(1), kmeans_iterations=20)
    assert sorted(assign[idx[0]].tolist()) == [0, 1, 2, 3]  # k-means++ seeds separate them


def test_map_proxy_indices_formula():
    idx = torch.tensor([[0, 1, 64, 65, 4224], [130, 7, 8, 9, 10]])
    got = map_proxy_indices(idx, (65, 65), (130, 130))
    expected = [[(i // 65) * 2 * 130 + (i % 65) * 2 for i in row] for row in idx.tolist()]
    assert got.tolist() == expected and got.dtype == torch.int64
    assert map_proxy_indices(torch.tensor([[5, 13]]), (3, 5), (5, 9)).tolist() == [[18, 42]]
    with pytest.raises(ValueError, match="dst_hw=.* is too small"):
        map_proxy_indices(idx, (65, 65), (64, 130))
    with pytest.raises(ValueError, match="src_hw must be a pair of positive ints"):
        map_proxy_indices(idx, (65, 0), (130, 130))


def test_gather_proxies_keeps_gradients():
    feat = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 19, 7], [3, 3, 12]])
    p = gather_proxies(feat, idx)
    assert p.shape == (2, 3, 3)
    assert torch.equal(p[1, 2], feat[1, :, 2, 2]) and torch.equal(p[0, 1], feat[0, :, 3, 4])
    assert torch.autograd.gradcheck(lambda f: gather_proxies(f, idx), (feat,))
    with pytest.raises(ValueError, match="idx must hold pixel indices"):
        gather_proxies(feat, idx + 10)
    with pytest.raises(TypeError, match="idx must be int64"):
        gather_proxies(feat, idx.int())


# ------------------------------------------------------------------------------------- loss

LOSS_CASES = [  # B, H, W, M, channels per layer (shallow -> deep)
    (2, 5, 6, 7, (3, 4)),
    (1, 7, 3, 1, (2, 5, 3)),  # M = 1: every distribution is a point mass
    (3, 4, 4, 16, (4, 8, 6, 5)),  # upstream L = 4
    (2, 3, 5, 33, (1, 2, 9)),  # M not a power of two, C = 1
]


def make_loss_inputs(case, dtype=torch.float64, device="cpu", grad=(True, True), scale=1.0):
    B, H, W, M, chans = case
    feats = [(scale * torch.randn(B, c, H, W, dtype=dtype, device=device)).requires_grad_(grad[0]) for c in chans]
    proxies = [(scale * torch.randn(B, M, c, dtype=dtype, device=device)).requires_grad_(grad[1]) for c in chans]
    return feats, proxies


def loss_and_grads(backend, feats, proxies, **kw):
    inputs = [t for t in feats + proxies if t.requires_grad]
    with busseg_ops.use_backend(backend):
        loss = cra_loss(feats, proxies, **kw)
    return loss, torch.autograd.grad(loss, inputs) if inputs else ()


def literal_loss(feats, proxies, reduction, eps):
    """SPEC §2.2 written out: mean over pairs of sum q (log q - log(p + eps)) / d."""
    P = [torch.einsum("bchw,bmc->bhwm", f, p).softmax(-1) for f, p in zip(feats, proxies)]
    B, H, W, M = P[0].shape
    d = {"mean": B * H * W * M, "batchmean": B, "sum": 1}[reduction]
    kls = [(q * (q.log() - (p + eps).log())).sum() / d for p, q in zip(P, P[1:])]
    return sum(kls) / len(kls)


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
def test_reference_loss_matches_the_formula(reduction):
    feats, proxies = make_loss_inputs(LOSS_CASES[2])
    with busseg_ops.use_backend("reference"):
        loss = cra_loss(feats, proxies, reduction, eps=1e-6)
    torch.testing.assert_close(loss, literal_loss(feats, proxies, reduction, 1e-6))


def triton_subset(case, reduction, grad):
    return (LOSS_CASES.index(case) + len(reduction) + grad.count(True)) % 3 == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("grad", [(True, True), (False, True), (True, False)])
def test_loss_backends_match_reference(device, case, reduction, grad):
    dtype = torch.float32
    feats, proxies = make_loss_inputs(case, dtype, device, grad, scale=1.5)
    ref_loss, ref_grads = loss_and_grads("reference", feats, proxies, reduction=reduction)
    for backend in backends(device):
        if backend == "triton" and device == "cpu" and not triton_subset(case, reduction, grad):
            continue  # the interpreter is slow: a spread of cases
        loss, grads = loss_and_grads(backend, feats, proxies, reduction=reduction)
        tol = tolerance(dtype)
        torch.testing.assert_close(loss, ref_loss, **tol, msg=f"{backend} loss")
        assert len(grads) == len(ref_grads)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            # "sum" gradients are large and the KL gradient cancels: atol relative to their size
            atol = tol["atol"] * max(1.0, r.abs().max().item())
            torch.testing.assert_close(g, r, rtol=tol["rtol"], atol=atol, msg=f"{backend} grad {i}")


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_loss_with_peaked_distributions_and_eps(backend):
    # large logits: many probabilities underflow, so eps and 0*log 0 = 0 both matter
    feats, proxies = make_loss_inputs((2, 4, 5, 9, (6, 6, 6)), scale=4.0)
    for eps in (1e-10, 0.1):
        ref, ref_grads = loss_and_grads("reference", feats, proxies, eps=eps)
        loss, grads = loss_and_grads(backend, feats, proxies, eps=eps)
        torch.testing.assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_gradcheck_float64(backend, reduction):
    feats, proxies = make_loss_inputs((2, 3, 4, 5, (2, 3, 4)))
    n = len(feats)
    with busseg_ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: cra_loss(list(t[:n]), list(t[n:]), reduction, 1e-3), (*feats, *proxies)
        )


def test_loss_gradcheck_triton():
    if "triton" not in busseg_ops.available_backends("cpu"):
        pytest.skip("triton is not available here")
    feats, proxies = make_loss_inputs((1, 2, 3, 4, (2, 3)))
    with busseg_ops.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda *t: cra_loss(list(t[:2]), list(t[2:]), "sum", 1e-3), (*feats, *proxies))


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_global_alignment(backend, monkeypatch):
    feats, _ = make_loss_inputs((2, 3, 4, 1, (2, 3, 5)))
    every_pixel = [f.flatten(2).transpose(1, 2) for f in feats]
    with busseg_ops.use_backend(backend):
        loss = cra_loss(feats)
        torch.testing.assert_close(loss, cra_loss(feats, every_pixel))
        monkeypatch.setattr(busseg_ops.cra, "_available_bytes", lambda device: 10_000)
        with pytest.raises(
            RuntimeError,
            match=r"global alignment .* needs about 0.0 MiB for the "
            r"\(L, B, HW, HW\) = \(3, 2, 12, 12\) logits",
        ):
            cra_loss(feats)


def test_loss_opcheck():
    feats, proxies = make_loss_inputs((2, 3, 4, 5, (2, 3, 4)))
    flat = [f.flatten(2) for f in feats]
    for reduction, rows, grad_proxies in (("mean", 5, False), ("batchmean", 12, True), ("sum", 64, True)):
        torch.library.opcheck(
            torch.ops.busseg.cra_align_blocked_forward, (flat, proxies, reduction, 1e-10, rows, grad_proxies)
        )
    _, lse, _ = torch.ops.busseg.cra_align_blocked_forward(flat, proxies, "mean", 1e-10, 5, False)
    detached = ([f.detach() for f in flat], [p.detach() for p in proxies])
    for need in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(
            torch.ops.busseg.cra_align_blocked_backward,
            (torch.tensor(1.5, dtype=torch.float64), *detached, lse, "sum", 1e-4, 5, *need),
        )
    feat = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.busseg.cra_greedy_sampling, (feat, torch.tensor([0, 7]), 6, 0.5))
    if "triton" in busseg_ops.available_backends("cpu"):
        logits = (
            torch.stack([torch.einsum("bchw,bmc->bhwm", f, p).flatten(1, 2) for f, p in zip(feats, proxies)])
            .detach()
            .requires_grad_()
        )
        # Fake-tensor tracing of a triton_op needs a GPU; the interpreter runs the kernel instead.
        torch.library.opcheck(
            torch.ops.busseg.cra_align_forward_triton,
            (logits, "mean", 1e-10),
            test_utils=("test_schema", "test_autograd_registration"),
        )


@pytest.mark.parametrize("rows", [1, 5, 12, 1000])
@pytest.mark.parametrize("grad", [(True, True), (False, True)])
def test_blocked_loss_any_block_rows(rows, grad):
    # blocks that do and do not divide HW = 12, and one block larger than HW; proxy gradients
    # recomputed in backward, or formed in forward (only the proxies need a gradient)
    feats, proxies = make_loss_inputs((2, 3, 4, 5, (2, 3, 4)), grad=grad)
    flat = [f.flatten(2) for f in feats]
    inputs = [t for t in feats + proxies if t.requires_grad]
    loss, _, unit = torch.ops.busseg.cra_align_blocked_forward(flat, proxies, "sum", 1e-4, rows, not grad[0])
    assert len(unit) == (0 if grad[0] else len(proxies))
    grads = torch.autograd.grad(loss * 1.5, inputs)
    ref, ref_grads = loss_and_grads("reference", feats, proxies, reduction="sum", eps=1e-4)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, 1.5 * r)


@pytest.mark.parametrize("M", [64, 71, 130])
@pytest.mark.parametrize("rows", [97, 4096])
@pytest.mark.parametrize("grad", [(True, True), (False, True)])
def test_cpu_float_products_on_large_shapes(M, rows, grad):
    # The float products of the CPU backend (AVX-512 kernels where available) in every piece:
    # more pixel rows than a panel (256) with a ragged tail, channel counts past a chunk (128)
    # and a gradient item (96) and not multiples of the 6-wide tile, M past 64 proxies and not a
    # multiple of 16, maps that are channel slices of a larger tensor, transposed proxies.
    B, H, W, chans = 2, 23, 29, (3, 130, 200, 97)
    feats = [torch.randn(B, c + 9, H, W)[:, 4 : 4 + c].requires_grad_(grad[0]) for c in chans]
    proxies = [torch.randn(B, c, M).transpose(1, 2).requires_grad_(grad[1]) for c in chans]
    inputs = [t for t in feats + proxies if t.requires_grad]
    loss, _, _ = torch.ops.busseg.cra_align_blocked_forward(
        [f.flatten(2) for f in feats], proxies, "batchmean", 1e-6, rows, not grad[0]
    )
    grads = torch.autograd.grad(loss, inputs)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in feats + proxies]
    ref, ref_grads = loss_and_grads("reference", exact[:4], exact[4:], reduction="batchmean", eps=1e-6)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        # logits of up to 200 unit-variance channels (std ~14) and float exp/log in the row
        # kernels: errors up to ~2e-5 of the largest gradient, with BLAS products the same
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=5e-5 * r.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    feats, proxies = make_loss_inputs((2, 5, 4, 6, (3, 4, 5)), dtype=torch.float32)
    inputs = feats + proxies
    fn = lambda *t: cra_loss(list(t[:3]), list(t[3:]))  # noqa: E731
    with busseg_ops.use_backend(backend):
        expected = fn(*inputs)
        g_expected = torch.autograd.grad(expected, inputs)
        loss = torch.compile(fn, fullgraph=True)(*inputs)
        grads = torch.autograd.grad(loss, inputs)
        feat = feats[-1].detach()
        first = torch.tensor([3, 11])
        idx = torch.compile(lambda f: greedy(f, 8, first=first), fullgraph=True)(feat)
        assert torch.equal(idx, greedy(feat, 8, first=first))
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, g_expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_loss_nan_propagates(backend):
    feats, proxies = make_loss_inputs((1, 3, 3, 4, (2, 2)), grad=(False, False))
    feats[0][0, 0, 1, 1] = float("nan")
    with busseg_ops.use_backend(backend):
        assert cra_loss(feats, proxies).isnan()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda f, p: cra_loss(f[:1], p[:1]), ValueError, "feats must be a list of L >= 2"),
        (lambda f, p: cra_loss(f[0], p), ValueError, "feats must be a list of L >= 2"),
        (lambda f, p: cra_loss([f[0], f[1][:, :, :2]], p), ValueError, r"feats\[0\] and feats\[1\] must share"),
        (
            lambda f, p: cra_loss([f[0], f[1].double()], p),
            TypeError,
            r"feats\[0\] and feats\[1\] must have the same dtype",
        ),
        (lambda f, p: cra_loss(f, p[:1]), ValueError, "proxies must be a list of L = 2"),
        (
            lambda f, p: cra_loss(f, [p[0], p[1][:, :, :2]]),
            ValueError,
            r"proxies\[1\] must be \(B, M, C_l\) = \(2, 5, 4\)",
        ),
        (lambda f, p: cra_loss(f, [p[0], p[1][:, :3]]), ValueError, r"proxies\[1\] must be \(B, M, C_l\)"),
        (lambda f, p: cra_loss(f, [p[0], p[1][0]]), ValueError, r"proxies\[1\] must have 3 dims"),
        (lambda f, p: cra_loss(f, p, reduction="none"), ValueError, "reduction must be one of"),
        (lambda f, p: cra_loss(f, p, eps=-1.0), ValueError, "eps must be a float >= 0"),
        (lambda f, p: cra_loss([f[0][:, :, :0], f[1][:, :, :0]], p), ValueError, r"feats\[0\] is empty"),
        (lambda f, p: cra_loss([f[0].long(), f[1]], p), TypeError, r"feats\[0\] must be one of"),
    ],
)
def test_loss_bad_inputs(call, error, match):
    feats = [torch.randn(2, 3, 4, 5), torch.randn(2, 4, 4, 5)]
    proxies = [torch.randn(2, 5, 3), torch.randn(2, 5, 4)]
    with pytest.raises(error, match=match):
        call(feats, proxies)


def test_direct_loss_ops_are_checked_in_cpp():
    f, p = [torch.randn(2, 3, 12)] * 2, [torch.randn(2, 5, 3)] * 2
    fwd, bwd = torch.ops.busseg.cra_align_blocked_forward, torch.ops.busseg.cra_align_blocked_backward
    with pytest.raises(ValueError, match="L >= 2 layers"):
        fwd(f[:1], p[:1], "mean", 1e-10, 4, False)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'batchmean' or 'sum'"):
        fwd(f, p, "none", 1e-10, 4, False)
    with pytest.raises(ValueError, match="block_rows must be >= 1"):
        fwd(f, p, "mean", 1e-10, 0, False)
    with pytest.raises(ValueError, match=r"proxies\[1\] must be \(B, M, C_l\) = \(2, 5, 3\)"):
        fwd(f, [p[0], torch.randn(2, 4, 3)], "mean", 1e-10, 4, False)
    with pytest.raises(ValueError, match=r"lse must be \(L, B, HW\)"):
        bwd(torch.tensor(1.0), f, p, torch.randn(2, 2), "sum", 1e-10, 4, True, True)


def test_cpu_fast_exp_log_accuracy():
    # float rows use polynomial exp/log: compare one row's loss and gradient against float64
    z = torch.linspace(-30, 30, 64)
    feats = [torch.ones(1, 1, 1), torch.ones(1, 1, 1)]
    proxies = [z.reshape(1, 64, 1), z.flip(0).reshape(1, 64, 1) * 0.5]
    loss, _, _ = torch.ops.busseg.cra_align_blocked_forward(feats, proxies, "sum", 1e-10, 1, False)
    ref, _, _ = torch.ops.busseg.cra_align_blocked_forward(
        [t.double() for t in feats], [t.double() for t in proxies], "sum", 1e-10, 1, False
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    feats, proxies = make_loss_inputs((2, 5, 6, 16, (8, 16, 32)), torch.float32, "cuda")
    ref, ref_grads = loss_and_grads("reference", feats, proxies)
    low = [t.detach().to(dtype).requires_grad_() for t in feats + proxies]
    loss, grads = loss_and_grads("cuda", low[:3], low[3:])
    torch.testing.assert_close(loss.float(), ref, **tolerance(dtype))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, **tolerance(dtype))
    feat = torch.randn(2, 16, 9, 11, device="cuda").to(dtype)
    first = torch.tensor([0, 50], device="cuda")
    assert all(len(set(row.tolist())) == 20 for row in run_greedy("cuda", feat, 20, first=first))
