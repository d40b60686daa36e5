"""greedy_proxy_sampling (RA-BUSSeg CRA proxies): the op contract, the reference against the
literal definition, ties, the first proxy, the CPU's half-precision screening and every plan of
the CUDA kernel."""

import subprocess
import sys

import pytest
import torch
from conftest import backends, torch_threads
from hypothesis import strategies as st
from op_contract import OpContract, RawSample, bad
from support.memory import peak_extra_mib

import busseg_ops
from busseg_ops import greedy_proxy_sampling as greedy
from busseg_ops.ops.greedy_proxy_sampling import OP


def sampling_backends(device="cpu"):
    return backends(device, exclude=("triton",))  # greedy sampling has no Triton version


def run_greedy(backend, feat, num_proxies, **kw):
    with busseg_ops.use_backend(backend):
        return greedy(feat, num_proxies, **kw)


def brute_force_greedy(feat, first, num_proxies, scale):
    """The definition literally: the whole (HW, HW) map, score(j) = max over t of c_t(j) recomputed
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


def _raw(feat=None, first=None, num_proxies=3):
    feat = torch.randn(1, 2, 3, 3) if feat is None else feat
    first = torch.tensor([0]) if first is None else first
    return lambda: torch.ops.busseg.greedy_proxy_sampling(feat, first, num_proxies, 1.0)


class TestGreedyProxySampling(OpContract):
    op = OP
    exact = True
    gradcheck_backends = ()
    compile_backends = ("cpu", "reference")
    cases = [
        (case, dtype, relu)
        for case in GREEDY_CASES
        for dtype, relu in [(torch.float64, False), (torch.float64, True), (torch.float32, False)]
    ]

    def make_inputs(self, case, device):
        (B, C, H, W, M), dtype, relu = case
        feat = torch.randn(B, C, H, W, dtype=dtype, device=device)
        feat = feat.relu() if relu else feat
        first = torch.randint(0, H * W, (B,), device=device)
        return feat, M, first

    def call(self, feat, num_proxies, first):
        return greedy(feat, num_proxies, first=first, scale=0.7)

    def check_reference(self, case, inputs, expected):
        (B, _, _, _, M), _, _ = case
        assert expected.dtype == torch.int64 and expected.shape == (B, M)
        assert all(len(set(row.tolist())) == M for row in expected)

    def variants(self, backend):
        # images in parallel (1 thread), and pixels of one image in parallel (2 threads)
        return [(f" with {threads} threads", torch_threads(threads)) for threads in (1, 2)]

    def property_case(self):
        # float64 features: the cpu backend's double sums agree with the reference's choice
        return st.tuples(
            st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.floats(0.05, 1.0)
        ).map(lambda c: ((c[0], c[1], c[2], c[3], max(1, int(c[4] * c[2] * c[3]))), torch.float64, False))

    def compile_inputs(self):
        # every tensor an input, so that the test moves it to the device under test
        return (lambda f, first: greedy(f, 8, first=first)), (torch.randn(2, 5, 4, 6), torch.tensor([3, 11]))

    def nan_inputs(self):
        feat = torch.randn(2, 6, 7, 9)
        feat[0, 2, 3, 4] = float("nan")  # pixel 31: NaN similarities count as +inf, never a hang
        return feat, 63, torch.tensor([5, 40])

    def check_nan(self, out, inputs):
        assert torch.equal(out, self.reference(*inputs))
        assert sorted(out[0].tolist()) == list(range(63)) and out[0, -1] == 31  # NaN pixel last

    def layout_inputs(self):
        return torch.randn(2, 6, 7, 9), 12, torch.tensor([5, 40])

    def bad_input_args(self):
        return (torch.randn(2, 4, 5, 7),)

    bad_inputs = [
        bad(lambda f: greedy(f, 36), ValueError, r"num_proxies must be <= H\*W = 35"),
        bad(lambda f: greedy(f, 0), ValueError, "num_proxies must be >= 1"),
        bad(lambda f: greedy(f, 2.0), TypeError, "num_proxies must be an int"),
        bad(lambda f: greedy(f[0]), ValueError, "feat must have 4 dims"),
        bad(lambda f: greedy(f[:, :, :0], 1), ValueError, "feat is empty"),
        bad(lambda f: greedy(f.long(), 3), TypeError, "feat must be one of float32, float64"),
        bad(lambda f: greedy(f, 3, label=torch.ones(2, 5, 6)), ValueError, r"label must be \(B, H, W\)"),
        bad(lambda f: greedy(f, 3, label=torch.ones(1, 5, 7)), ValueError, r"label must be \(B, H, W\) ="),
        bad(lambda f: greedy(f, 3, first=torch.tensor([0, 35])), ValueError, "first must hold pixel indices"),
        bad(lambda f: greedy(f, 3, first=torch.tensor([0])), ValueError, r"first must be \(B,\)"),
        bad(lambda f: greedy(f, 3, first=torch.tensor([0.0, 1.0])), TypeError, "first must be an integer"),
        bad(lambda f: greedy(f, 3, generator=0), TypeError, "generator must be a torch.Generator"),
        bad(lambda f: greedy(f, 2**64), ValueError, "num_proxies must be <= "),
        # scalars (issue 29): an infinite scale made the CPU and the reference disagree; a bool is no number
        bad(lambda f: greedy(f, 3, scale=float("inf")), ValueError, "scale must be a finite float, got inf"),
        bad(lambda f: greedy(f, 3, scale=-float("inf")), ValueError, "scale must be a finite float, got -inf"),
        bad(lambda f: greedy(f, 3, scale=float("nan")), ValueError, "scale must be a finite float, got nan"),
        bad(lambda f: greedy(f, 3, scale=False), TypeError, "scale must be a float, got bool"),
        bad(lambda f: greedy(f, True), TypeError, "num_proxies must be an int, got bool"),
    ]

    raw_bad_inputs = [
        bad(_raw(num_proxies=10), ValueError, r"num_proxies must be in \[1, H\*W = 9\]"),
        bad(_raw(first=torch.tensor([9])), ValueError, "first must hold pixel indices"),
        bad(_raw(first=torch.tensor([0], dtype=torch.int32)), TypeError, "first must be int64"),
        bad(
            _raw(feat=torch.ones(1, 2, 3, 3, dtype=torch.int64)),
            TypeError,
            "feat must be float32, float64, float16 or bfloat16",
        ),
        bad(_raw(first=torch.tensor([0], device="meta")), ValueError, "first must be on the device of feat"),
        bad(_raw(num_proxies=2**63 - 1), ValueError, "num_proxies must be in"),
    ]

    def raw_samples(self):
        feat = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        return [
            RawSample(OP.name, (feat, torch.tensor([0, 7]), 6, 0.5), free={(0, "dim", 1), (0, "dim", 2), (0, "dim", 3)})
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
    # the smallest running max max(c_1, c_2): the greedy rule picks 4.
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
        with torch_threads(threads):
            got = run_greedy("cpu", feat, M, first=first)
        assert torch.equal(got, expected), f"{threads} threads"


@pytest.mark.parametrize("magnitude", [1e-6, 1e5])
def test_float_sampling_beyond_the_half_normal_range(magnitude):
    # 1e-6: subnormal in half (absolute rounding); 1e5: beyond half, the plain float loop runs.
    feat = torch.randn(2, 24, 9, 8) * magnitude
    first = torch.tensor([3, 70])
    expected = run_greedy("reference", feat.double(), 30, first=first)
    assert torch.equal(run_greedy("cpu", feat, 30, first=first), expected)


def test_greedy_memory_at_128x128():
    setup = """
import torch, busseg_ops
feat = torch.randn(1, 256, 128, 128)
first = torch.tensor([0])
"""
    mib = peak_extra_mib(setup, "busseg_ops.greedy_proxy_sampling(feat, 64, first=first)")
    assert mib < 64, f"greedy sampling at 128x128 added {mib:.0f} MiB (the HW x HW map is 1024)"


# The CUDA kernel plans each call (csrc/greedy_proxy_sampling/cuda.cu): P blocks per image (about
# SMs / B, fewer for little work), the first channels of a block's pixels in shared memory, the
# next 48 of each thread's first pixel in registers, the rest read from L2 every step; the blocks
# of an image agree on each proxy through a cluster (sm_90, P <= 16, all clusters resident), a
# global barrier (cooperative launch, images in launches that fit at once) or not at all (P = 1).
# The shapes below reach every plan on a 114-132 SM GPU (P on 132 SMs in the comments).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PLANS = [  # B, C, H, W, M
    (1, 256, 65, 65, 64),  # P = 17 > 16: barrier; all channels on chip (208 shared + 48 registers)
    (3, 256, 65, 65, 300),  # P = 17: barrier
    (8, 256, 65, 65, 64),  # P = 16: cluster (or barrier where 8 clusters of 16 do not fit)
    (16, 256, 65, 65, 64),  # P = 8: cluster
    (40, 64, 65, 65, 20),  # P = 3: cluster
    (2, 300, 33, 31, 33 * 31),  # P = 5: cluster, every pixel chosen (all ties broken by index)
    (2, 256, 127, 129, 64),  # P = 64: barrier
    (200, 7, 65, 65, 5),  # P = 1: a block per image, odd C
    (200, 256, 65, 65, 8),  # P = 1: 9 pixels per thread, 8 channels shared, 48 in registers, 200 from L2
    (100, 8, 256, 256, 5),  # P = 3 for the state alone: barrier in launches of 44 images, none cached
    (1, 1, 65, 65, 65 * 65),  # P = 1, C = 1: every pixel chosen
]


def exact_features(shape, dtype=torch.float32):
    """Entries in {-1, 0, 1}: with scale 1/2 every similarity sum is exact in float32 (|c| < 2^22)
    whatever the summation order, so all backends must agree exactly; many exact ties."""
    return torch.randint(-1, 2, shape, device="cuda").to(dtype)


@needs_cuda
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_cuda_greedy_plans_match_reference(plan):
    B, C, H, W, M = plan
    feat = exact_features((B, C, H, W))
    first = torch.randint(0, H * W, (B,), device="cuda")
    expected = run_greedy("reference", feat, M, first=first, scale=0.5)
    assert torch.equal(run_greedy("cuda", feat, M, first=first, scale=0.5), expected)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [2, 8])
def test_cuda_greedy_plans_dtypes(dtype, B):
    # float64: no registers, 2/5 of the channels in shared memory; half types: all of them
    shape = (B, 256, 65, 65)
    feat = torch.randn(shape, device="cuda", dtype=dtype) if dtype == torch.float64 else exact_features(shape, dtype)
    first = torch.randint(0, 65 * 65, (B,), device="cuda")
    expected = run_greedy("reference", feat, 64, first=first, scale=0.5)
    assert torch.equal(run_greedy("cuda", feat, 64, first=first, scale=0.5), expected)


@needs_cuda
def test_cuda_greedy_is_the_same_in_every_plan():
    # Rounded float32 sums: every plan sums each pixel's product in the same order, so an image
    # gets the same proxies alone (barrier), in batches of 8, 16, 40 (clusters) or 200 (one block,
    # mostly read from L2).
    feat = torch.randn(200, 256, 65, 65, device="cuda")
    first = torch.randint(0, 65 * 65, (200,), device="cuda")
    whole = run_greedy("cuda", feat, 64, first=first)
    for B in (1, 3, 8, 16, 40):
        assert torch.equal(run_greedy("cuda", feat[:B], 64, first=first[:B]), whole[:B]), f"B = {B}"
    assert torch.equal(run_greedy("cuda", feat[150:151], 64, first=first[150:151]), whole[150:151])


@needs_cuda
@pytest.mark.parametrize("B", [1, 2, 8])
def test_cuda_greedy_ties(B):
    feat = torch.ones(2, 3, 5, 5, device="cuda")  # every unchosen pixel ties at every step
    idx = run_greedy("cuda", feat, 7, first=torch.tensor([6, 0], device="cuda"))
    assert idx.tolist() == [[6, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]
    feat = torch.randint(-2, 3, (3, 2, 5, 5)).double()  # small integers, scale 1: exact sums
    first = torch.tensor([0, 12, 24])
    got = run_greedy("cuda", feat.cuda(), 25, first=first.cuda(), scale=1.0)
    assert torch.equal(got.cpu(), brute_force_greedy(feat, first, 25, 1.0))
    big = torch.ones(B, 256, 65, 65, device="cuda")  # split over blocks: ties across blocks
    first = torch.tensor([4000] + [0] * (B - 1), device="cuda")
    idx = run_greedy("cuda", big, 300, first=first)
    assert idx[0].tolist() == [4000] + list(range(299))
    assert all(row.tolist() == list(range(300)) for row in idx[1:])


@needs_cuda
@pytest.mark.parametrize("B", [2, 8])
def test_cuda_greedy_nan(B):
    HW = 65 * 65
    feat = torch.randn(B, 256, 65, 65, device="cuda", dtype=torch.float64)
    feat[0, 3, 10, 20] = feat[0, 200, 64, 1] = float("nan")  # pixels 670 and 4161
    feat[1, 5, 0, 9] = float("nan")  # image 1 starts at NaN pixel 9: every score NaN (+inf)
    first = torch.tensor([2000, 9] + [0] * (B - 2), device="cuda")
    got = run_greedy("cuda", feat, HW, first=first)
    assert torch.equal(got, run_greedy("reference", feat, HW, first=first))
    assert sorted(got[0, -2:].tolist()) == [670, 4161]  # NaN pixels last
    assert got[1].tolist() == [9] + [j for j in range(HW) if j != 9]


@needs_cuda
def test_cuda_greedy_errors_raise_cleanly():
    # A bad raw call on CUDA tensors raises a Python exception: in a child process, so that a
    # crash (a C++ exception thrown through the CUDA binding) shows as its exit status.
    code = """
import torch, busseg_ops  # noqa: F401
feat, first = torch.randn(1, 7, 9, 9, device="cuda"), torch.tensor([0], device="cuda")
for num_proxies, bad_first in ((82, first), (3, first.int())):
    try:
        torch.ops.busseg.greedy_proxy_sampling(feat, bad_first, num_proxies, 1.0)
    except (ValueError, TypeError) as err:
        print(type(err).__name__)
"""
    out = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ValueError", "TypeError"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    feat = torch.randn(2, 16, 9, 11, device="cuda").to(dtype)
    first = torch.tensor([0, 50], device="cuda")
    assert all(len(set(row.tolist())) == 20 for row in run_greedy("cuda", feat, 20, first=first))
