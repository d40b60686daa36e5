"""memory_contrastive_loss (PH-Net Eq. 15): the op contract, the reference against the loss
written per anchor, skipped classes, gradients, and the O(N + N⁻) memory bound."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import backends, tolerance
from hypothesis import strategies as st
from matmul_precision import TF32_EPS, every_precision, matmul_precision, to_tf32
from op_contract import OpContract, RawSample, bad

import busseg_ops
from busseg_ops import memory_contrastive_loss as mcl
from busseg_ops.backends import choose_backend, dispatch
from busseg_ops.ops.memory_contrastive_loss import OP
from busseg_ops.reference.memory_contrastive_loss import memory_contrastive_loss as reference_mcl

_ops = torch.ops.busseg


def make(N, M, D, K=2, device="cpu", dtype=torch.float32, neg_grad=False):
    anchors = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    ya = torch.randint(0, K, (N,), device=device)
    negatives = torch.randn(M, D, device=device, dtype=dtype, requires_grad=neg_grad)
    yn = torch.randint(0, K, (M,), device=device)
    positives = torch.randn(K, D, device=device, dtype=dtype)
    return anchors, ya, negatives, yn, positives


def naive(anchors, ya, negatives, yn, positives, tau):
    """Eq. 15 written per anchor with Python loops: an oracle independent of the reference."""
    classes, total = 0, 0.0
    for c in range(positives.shape[0]):
        idx = (ya == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        classes += 1
        terms = []
        for i in idx:
            z = anchors[i]
            pos = F.cosine_similarity(z, positives[c], 0, eps=1e-12) / tau
            neg = F.cosine_similarity(z[None], negatives[yn != c], 1, eps=1e-12) / tau
            terms.append(-(pos - torch.logsumexp(torch.cat([pos[None], neg]), 0)))
        total = total + torch.stack(terms).mean()
    return total / classes


def _raw(**changes):
    a, ya, n, yn, p = make(4, 5, 3)
    args = dict(a=a, ya=ya, n=n, yn=yn, p=p, has=torch.ones(2, dtype=torch.bool), temperature=0.5)
    args.update(changes)
    return lambda: _ops.memory_contrastive_loss(
        args["a"], args["ya"], args["n"], args["yn"], args["p"], args["has"], args["temperature"], True
    )


def _raw_backward(**changes):
    a, ya, n, yn, p = make(4, 5, 3)
    has = torch.ones(2, dtype=torch.bool)
    args = dict(grad_loss=torch.tensor(1.0), lse=torch.randn(4), weighted_negatives=torch.randn(4, 3))
    args.update(changes)
    return lambda: _ops.memory_contrastive_loss_backward(
        args["grad_loss"], a.detach(), ya, n, yn, p, has, args["lse"], args["weighted_negatives"], 0.5, True
    )


class TestMemoryContrastiveLoss(OpContract):
    op = OP
    cases = [
        (N, M, D, K, neg_grad)
        for N, M, D, K in [(5, 7, 3, 2), (37, 70, 16, 2), (64, 33, 20, 3), (1, 1, 8, 2)]
        for neg_grad in (False, True)
    ] + [(9, 12, 5, 3, True, torch.float64)]

    def make_inputs(self, case, device):
        N, M, D, K, neg_grad, *dtype = case
        a, ya, n, yn, p = make(N, M, D, K, device, (dtype or [torch.float32])[0], neg_grad)
        return a, ya, n, yn, p, 0.5

    def call(self, a, ya, n, yn, p, temperature):
        return mcl(a, ya, n, yn, p, temperature)

    def grad_tolerance(self, dtype, expected):
        return dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else super().grad_tolerance(dtype, expected)

    def property_case(self):
        return st.tuples(
            st.integers(0, 40), st.integers(0, 40), st.integers(1, 24), st.integers(1, 4), st.booleans()
        ).map(lambda c: c + (torch.float64,))

    def gradcheck_inputs(self, case, backend):
        a, ya, n, yn, p = make(6, 8, 4, K=3, dtype=torch.float64, neg_grad=True)
        ya[0] = 7  # an ignored anchor label
        return (lambda x, y: mcl(x, ya, y, yn, p, 0.5)), (a, n)

    def compile_inputs(self):
        # every tensor an input, so that the test moves it to the device under test
        return (lambda *t: mcl(*t, 0.4)), make(20, 30, 8, neg_grad=True)

    def nan_inputs(self):
        a, ya, n, yn, p = make(4, 5, 3)
        ya[:] = 0
        yn[:] = 1
        a.data[0, 0] = float("nan")
        return a, ya, n, yn, p, 0.5

    def check_nan(self, out, inputs):
        assert out.isnan()

    def layout_inputs(self):
        a, ya, n, yn, p = make(10, 12, 6, K=3)
        return a.detach(), ya, n, yn, p, 0.5

    def bad_input_args(self):
        return make(4, 5, 3)

    bad_inputs = [
        bad(lambda a, ya, n, yn, p: mcl(a[0], ya, n, yn, p), ValueError, "anchors must have 2 dims"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya[:2], n, yn, p), ValueError, "anchor_labels must be"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n[:, :2], yn, p), ValueError, "anchors and negatives must share D"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn[:1], p), ValueError, "negative_labels must be"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya.int(), n, yn, p), TypeError, "anchor_labels must be int64"),
        bad(
            lambda a, ya, n, yn, p: mcl(a, ya, n.double(), yn, p),
            TypeError,
            "anchors and negatives must have the same dtype",
        ),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p[:, :2]), ValueError, "positives must be"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p, temperature=0), ValueError, "temperature must be a finite"),
        # scalars (issue 29): an infinite temperature or True was taken; a bool is no number
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p, temperature=-0.5), ValueError, "float > 0, got -0.5"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p, temperature=float("inf")), ValueError, "float > 0, got inf"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p, temperature=float("nan")), ValueError, "float > 0, got nan"),
        bad(
            lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p, temperature=True),
            TypeError,
            "temperature must be a float, got bool",
        ),
        bad(lambda a, ya, n, yn, p: mcl(a.long(), ya, n, yn, p), TypeError, "anchors must be one of"),
        bad(lambda a, ya, n, yn, p: mcl(a, ya, n, yn, "p"), TypeError, "positives must be"),
    ]

    raw_bad_inputs = [
        bad(_raw(temperature=0.0), ValueError, "temperature must be > 0"),
        bad(_raw(temperature=float("nan")), ValueError, "temperature must be > 0"),
        bad(_raw(ya=torch.zeros(3, dtype=torch.int64)), ValueError, r"anchor_labels must be \(N,\)"),
        bad(_raw(ya=torch.zeros(4)), TypeError, "anchor_labels and negative_labels must be int64"),
        bad(_raw(has=torch.ones(3, dtype=torch.bool)), ValueError, r"has_positive must be \(K,\)"),
        bad(_raw(has=torch.ones(2)), TypeError, "has_positive must be bool"),
        bad(_raw(p=torch.randn(2, 4)), ValueError, "positives must be"),
        bad(_raw(n=torch.randn(5, 4)), ValueError, "negatives must be"),
        bad(_raw(a=torch.ones(4, 3, dtype=torch.int32)), TypeError, "anchors must be float32"),
        bad(_raw(p=torch.randn(2, 3, device="meta")), ValueError, "device"),
        bad(_raw_backward(lse=torch.randn(3)), ValueError, r"lse must be \(N,\)"),
        bad(_raw_backward(grad_loss=torch.ones(2)), ValueError, "grad_loss must be a scalar"),
        bad(_raw_backward(lse=torch.randn(4, device="meta")), ValueError, "device"),
        bad(_raw_backward(weighted_negatives=torch.randn(4, 2)), ValueError, r"weighted_negatives must be \(N, D\)"),
        bad(_raw_backward(weighted_negatives=torch.empty(1, 0)), ValueError, r"or \(0,\), got \[1, 0\]"),
        bad(
            _raw_backward(weighted_negatives=torch.ones(4, 3, dtype=torch.int64)),
            TypeError,
            "weighted_negatives must be",
        ),
    ]

    def raw_samples(self):
        a, ya, n, yn, p = make(9, 11, 5, K=3, dtype=torch.float64, neg_grad=True)
        has = torch.tensor([True, False, True])
        args = (a, ya, n, yn, p, has, 0.5)
        _, lse, weighted = _ops.memory_contrastive_loss(*args, True)
        g = torch.tensor(1.0, dtype=torch.float64)
        backward = (a.detach(), ya, n.detach(), yn, p, has, lse)
        return [
            RawSample(OP.name, (*args, False)),
            RawSample(OP.name, (*args, True)),
            RawSample(f"{OP.name}_backward", (g, *backward, a.new_empty(0), 0.5, True), free={(0, "rank")}),
            RawSample(f"{OP.name}_backward", (g, *backward, a.new_empty(0), 0.5, False), free={(0, "rank")}),
            RawSample(f"{OP.name}_backward", (g, *backward, weighted, 0.5, False), free={(0, "rank")}),
        ]


def test_reference_matches_per_anchor_formula():
    a, ya, n, yn, p = make(7, 9, 5, K=3, dtype=torch.float64)
    with busseg_ops.use_backend("reference"):
        loss = mcl(a, ya, n, yn, p, 0.3)
    torch.testing.assert_close(loss, naive(a, ya, n, yn, p, 0.3))


@pytest.mark.parametrize("neg_grad", [True, False], ids=["negative-grad", "saved-weighted-negatives"])
@pytest.mark.parametrize(
    "shape,tau",
    [
        # 1024-row tiles: N, N⁻ > 1024 exercise the online LSE across blocks and partial tiles.
        (dict(N=1500, M=2100, D=8), 0.1),
        # The float32 tiles' edges: D = 131 (two 64-feature chunks and a 3-lane tail), 203 anchors
        # (96-row tiles ending in a partial 6-row micro-tile), negatives not a multiple of 16 per
        # class and of 256-column tiles (two per class: the running max moves between them).
        (dict(N=203, M=700, D=131, K=3), 0.2),
    ],
)
def test_cpu_tiles_match_the_reference(shape, tau, neg_grad):
    """Loss and gradients; without a negative gradient the anchors' comes from the forward's
    weighted_negatives (backward makes no pass over the tiles)."""
    a, ya, n, yn, p = make(**shape, neg_grad=neg_grad)
    wrt = (a, n) if neg_grad else (a,)
    with busseg_ops.use_backend("reference"):
        ref = mcl(a, ya, n, yn, p, tau)
        ref_g = torch.autograd.grad(ref, wrt)
    with busseg_ops.use_backend("cpu"):
        loss = mcl(a, ya, n, yn, p, tau)
        grads = torch.autograd.grad(loss, wrt)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


# ---- the tensor-core kernels (Triton; CUDA on a GPU) in every precision against float64 --------


def structured(anchor_counts, negative_counts, D, ignored=(), odd_negatives=(), device="cpu", dtype=torch.float64):
    """Inputs with set class sizes, shuffled: anchor_counts[c] anchors and negative_counts[c]
    negatives of class c, plus anchors with the labels in `ignored` (outside [0, K)) and negatives
    with the labels in `odd_negatives` (they count for every class)."""
    K = len(anchor_counts)

    def labels(counts, extra):
        y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)] + [torch.tensor(extra, dtype=torch.int64)])
        return y[torch.randperm(len(y))].to(device)

    ya, yn = labels(anchor_counts, ignored), labels(negative_counts, odd_negatives)
    anchors = torch.randn(len(ya), D, device=device, dtype=dtype)
    negatives = torch.randn(len(yn), D, device=device, dtype=dtype)
    return anchors, ya, negatives, yn, torch.randn(K, D, device=device, dtype=dtype)


#: Problems that between them take every path of the Triton kernels (test_kernel_paths_are_covered
#: checks which): sorted runs of uneven classes whose tiles are skipped, a class without anchors, a
#: class without positive (has_positive: the last class never has one), ignored anchors, anchor and
#: negative counts off the blocks, negatives split across programs, resident rows with one and with
#: two accumulator column blocks, chunked products past 256 features, tiny and odd D.
KERNEL_CASES = {
    "uneven classes": dict(anchor_counts=(150, 7, 0, 9), negative_counts=(40, 100, 90, 3), D=20, ignored=(-1, 4, 9)),
    "split negatives": dict(anchor_counts=(20, 17), negative_counts=(160, 140), D=64, odd_negatives=(5, -3)),
    "odd D, two column blocks": dict(anchor_counts=(70, 60), negative_counts=(33, 64), D=131),
    "chunked D": dict(anchor_counts=(30, 41, 5), negative_counts=(50, 20, 20), D=300, ignored=(-2,)),
    "D = 1": dict(anchor_counts=(3, 66), negative_counts=(70, 1), D=1),
}


def kernel_tolerance(dtype, precision, tau, expected):
    """What a kernel result may differ by from float64 on the same inputs: float64 and exact
    float32 as everywhere; TF32 (float32 operands, 10 mantissa bits): a cosine's error is below
    2·TF32_EPS (both unit operands), the loss's below that over τ, and a gradient's, a sum of
    products of such terms, within a few TF32_EPS of the largest gradient (the emulation in
    test_tf32_tolerance_covers_emulated_tf32 measures 0.7 TF32_EPS; plus float32's floor, for
    gradients that vanish, as at D = 1); float16 / bfloat16 the dtype's tolerance relative to the
    result's size (operands and the saved log-sum-exp are rounded)."""
    if dtype == torch.float32 and precision == "tf32":
        if expected.dim() == 0:
            return dict(rtol=0.0, atol=2 * 2 * TF32_EPS / tau)
        return dict(rtol=4 * TF32_EPS, atol=4 * TF32_EPS * expected.abs().max().item() + 1e-6)
    tol = tolerance(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, expected.abs().max().item()))
    return tol if expected.dim() == 0 else dict(rtol=tol["rtol"], atol=tol["atol"] / 10)


def kernel_run(backend, inputs, has_positive, tau, neg_grad):
    """Loss and gradients (anchors, and negatives when they require one) of one backend."""
    a, ya, n, yn, p = inputs
    a, n = a.detach().requires_grad_(), n.detach().requires_grad_(neg_grad)
    positives = [p[c] if has else None for c, has in enumerate(has_positive.tolist())]
    with busseg_ops.use_backend(backend):
        loss = mcl(a, ya, n, yn, positives, tau)
    return loss, torch.autograd.grad(loss, (a, n) if neg_grad else (a,))


def _gpu_or_triton_backends():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [(device, b) for b in backends(device, exclude=("cpu",))]


@pytest.mark.parametrize("neg_grad", [False, True], ids=["anchors", "negatives-too"])
@every_precision
@pytest.mark.parametrize("case", list(KERNEL_CASES))
@pytest.mark.parametrize("device,backend", _gpu_or_triton_backends())
def test_kernels_match_float64(device, backend, case, dtype, precision, neg_grad):
    """The Triton kernels (and on a GPU the CUDA ones) on every path against the float64 reference
    on the same rounded inputs, in every precision: float32 exact and in TF32 as PyTorch's matmul
    precision says (the interpreter runs tl.dot exactly, so on the CPU TF32 is the exact float32
    result through the TF32 launch configuration), float16 and bfloat16 on tensor cores with
    float32 accumulation, float64."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's tl.dot misreads bfloat16 (numpy has none); the GPU runs it")
    inputs = structured(**KERNEL_CASES[case], device=device)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    K = inputs[4].shape[0]
    has_positive = torch.arange(K) < K - 1 if K > 2 else torch.ones(K, dtype=torch.bool)
    tau = 0.2
    exact = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    ref_loss, ref_grads = kernel_run("reference", exact, has_positive, tau, neg_grad)
    with matmul_precision(precision):
        loss, grads = kernel_run(backend, inputs, has_positive, tau, neg_grad)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **kernel_tolerance(dtype, precision, tau, ref_loss))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, **kernel_tolerance(dtype, precision, tau, r))


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_tf32_tolerance_covers_emulated_tf32(case):
    """The TF32 tolerance of test_kernels_match_float64 against TF32 emulated on the CPU: the
    float64 reference on inputs whose mantissas are cut to TF32's 10 bits stays within it (and
    differs: the tolerance is not idle), for the loss and both gradients."""
    inputs = structured(**KERNEL_CASES[case])
    K = inputs[4].shape[0]
    has_positive = torch.arange(K) < K - 1 if K > 2 else torch.ones(K, dtype=torch.bool)
    exact_loss, exact_grads = kernel_run("reference", inputs, has_positive, 0.2, True)
    rounded = tuple(to_tf32(t) if t.is_floating_point() else t for t in inputs)
    loss, grads = kernel_run("reference", rounded, has_positive, 0.2, True)
    assert (loss != exact_loss) == (KERNEL_CASES[case]["D"] > 1)  # at D = 1 every unit row is ±1 exactly
    torch.testing.assert_close(loss, exact_loss, **kernel_tolerance(torch.float32, "tf32", 0.2, exact_loss))
    for g, r in zip(grads, exact_grads):
        torch.testing.assert_close(g, r, **kernel_tolerance(torch.float32, "tf32", 0.2, r))


def test_kernel_paths_are_covered():
    """KERNEL_CASES take every path of the Triton launchers (as they choose them here; on a GPU
    the split follows its SM count): resident rows with one and with two column blocks, chunked
    tensor-core products, FMA products, skipped tiles, a split and an unsplit forward."""
    from busseg_ops.triton import memory_contrastive_loss as kernels

    seen = set()
    for case in KERNEL_CASES.values():
        a, ya, n, yn, p = structured(**case)
        for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.float16, "ieee")):
            with matmul_precision(precision):
                layout = kernels._layout(dtype, case["D"])
            meta = layout.meta
            if meta["RESIDENT"]:
                seen.add("resident, one column block" if layout.block_d == layout.stride else "resident, column blocks")
            else:
                seen.add("chunked" if meta["PRECISION"] == "tf32" or dtype != torch.float32 else "fma")
            rows = -(-a.shape[0] // kernels._BLOCK) * (layout.stride // layout.block_d)
            splits, _ = kernels._splits(rows, n.shape[0], meta["BLOCK_STREAM"], a.device)
            seen.add("split" if splits > 1 else "one split")
        sorted_labels = ya.sort().values
        if any(torch.equal(sorted_labels[i : i + kernels._BLOCK], sorted_labels[i].expand(kernels._BLOCK))
               for i in range(0, len(ya) - kernels._BLOCK + 1, kernels._BLOCK)):  # fmt: skip
            seen.add("one-class anchor block")
    assert seen == {
        "resident, one column block",
        "resident, column blocks",
        "chunked",
        "fma",
        "split",
        "one split",
        "one-class anchor block",
    }


def test_dot_precision_follows_pytorch():
    """The Triton kernels' float32 products are TF32 exactly when PyTorch's float32 matmuls may be,
    whichever API set it; other dtypes are unaffected."""
    from busseg_ops.triton._precision import dot_precision

    for set_precision, want in (
        (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
        (lambda: torch.set_float32_matmul_precision("medium"), "tf32"),
        (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
        (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
        (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
    ):
        with matmul_precision("ieee"):
            set_precision()
            assert dot_precision(torch.float32) == want
            assert dot_precision(torch.bfloat16) == dot_precision(torch.float64) == "ieee"
    torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile traces the Triton launchers on a GPU only")
def test_compiled_call_follows_a_precision_change(monkeypatch):
    """Inductor traces the launcher into the graph, so it reads the precision when it compiles; a
    change of PyTorch's precision must recompile (Dynamo's global-state guard), never keep the old."""
    from busseg_ops.triton import memory_contrastive_loss as kernels

    seen = []
    original = kernels.dot_precision
    monkeypatch.setattr(kernels, "dot_precision", lambda dtype: seen.append(original(dtype)) or seen[-1])
    a, ya, n, yn, p = make(40, 50, 8, device="cuda")
    compiled = torch.compile(lambda a: mcl(a, ya, n, yn, p, 0.5), fullgraph=True)
    with busseg_ops.use_backend("triton"):
        with matmul_precision("ieee"):
            exact = compiled(a)
        assert seen and set(seen) == {"ieee"}
        seen.clear()
        with matmul_precision("tf32"):
            fast = compiled(a)
        assert seen and set(seen) == {"tf32"}
    torch.testing.assert_close(fast, exact, **kernel_tolerance(torch.float32, "tf32", 0.5, exact))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    a, ya, n, yn, p = make(6, 8, 4, K=3, dtype=torch.float64, neg_grad=True)
    ya[0] = 7  # an ignored anchor label
    with busseg_ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, y: mcl(x, ya, y, yn, p, 0.5), (a, n))
        # anchors alone: the gradient from forward's saved weighted_negatives
        assert torch.autograd.gradcheck(lambda x: mcl(x, ya, n.detach(), yn, p, 0.5), (a,))


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (37, 70, 16, 2), (203, 700, 131, 3)])
def test_weighted_negatives_match_the_reference(backend, dtype, shape):
    """The forward's weighted_negatives Σ_j π_ij n̂_j against the materialising reference, on odd
    shapes and across column tiles (float32: the AVX-512 tiles; float64: the at::mm driver), with
    an ignored anchor and a class without positive (zero rows); empty when not asked for."""
    N, M, D, K = shape
    a, ya, n, yn, p = make(N, M, D, K, dtype=dtype)
    ya[0] = -1
    has = torch.ones(K, dtype=torch.bool)
    has[-1] = K < 3  # of three classes, the last has no positive
    args = (a.detach(), ya, n, yn, p, has, 0.2)
    ref_loss, ref_lse, ref = reference_mcl(*args, True)
    with busseg_ops.use_backend(backend):
        assert choose_backend(OP, a.device) == backend
        loss, lse, weighted = dispatch(OP, a.device)(*args, True)
        _, _, none = dispatch(OP, a.device)(*args, False)
    assert weighted.shape == (N, D) and none.shape == (0,)
    assert torch.equal(weighted[0], torch.zeros(D, dtype=dtype))
    torch.testing.assert_close(loss, ref_loss, **tolerance(dtype))
    torch.testing.assert_close(weighted, ref, **tolerance(dtype))


def test_positives_never_get_a_gradient_and_detached_negatives_none():
    a, ya, n, yn, p = make(6, 8, 4)
    p.requires_grad_()
    loss = mcl(a, ya, n, yn, p)
    loss.backward()
    assert p.grad is None and n.grad is None and a.grad is not None and a.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_class_without_anchor_or_positive_is_skipped(backend):
    a, ya, n, yn, p = make(10, 12, 4, K=3, dtype=torch.float64)
    ya[:] = torch.arange(10) % 2  # class 2 has no anchor
    with busseg_ops.use_backend(backend):
        full = mcl(a, ya, n, yn, p)
        # class 1 without positive: only class 0 counts
        only0 = mcl(a, ya, n, yn, [p[0], None, p[2]])
    keep = ya == 0
    torch.testing.assert_close(full, naive(a, ya, n, yn, p, 0.5))
    torch.testing.assert_close(only0, naive(a[keep], ya[keep], n, yn, p, 0.5))


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_all_empty_is_a_zero_loss_that_backpropagates(backend):
    a, ya, n, yn, p = make(4, 5, 3)
    with busseg_ops.use_backend(backend):
        none_left = mcl(a, ya, n, yn, [None, None])
        no_anchor = mcl(a[:0], ya[:0], n, yn, p)
        no_rows = mcl(a[:0], ya[:0], n[:0], yn[:0], p)
    for loss in (none_left, no_anchor, no_rows):
        assert loss.item() == 0 and loss.requires_grad
    (g,) = torch.autograd.grad(none_left, a)
    assert torch.equal(g, torch.zeros_like(a))
    no_rows.backward()


def test_negatives_without_other_classes_reduce_to_the_positive_term():
    a, ya, n, yn, p = make(5, 6, 4)
    ya[:] = 0
    yn[:] = 0  # no negative of another class: every ℓ = log(e^pos / e^pos) = 0
    torch.testing.assert_close(mcl(a, ya, n, yn, p), torch.tensor(0.0))


_MEMORY_CHILD = """
import torch, busseg_ops
torch.set_num_threads(2)
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024
N = D = None
g = torch.Generator().manual_seed(0)
a = torch.randn(32768, 64, generator=g).requires_grad_()
n = torch.randn(32768, 64, generator=g)
ya = torch.randint(0, 2, (32768,), generator=g)
yn = torch.randint(0, 2, (32768,), generator=g)
p = torch.randn(2, 64, generator=g)
with busseg_ops.use_backend('cpu'):
    small = busseg_ops.memory_contrastive_loss(a[:64], ya[:64], n[:64], yn[:64], p)
    small.backward()  # warm the allocator and the BLAS threads
    a.grad = None
    try:
        open('/proc/self/clear_refs', 'w').write('5')
    except OSError:
        pass
    base, before = rss(), hwm()
    loss = busseg_ops.memory_contrastive_loss(a, ya, n, yn, p)
    loss.backward()
print(hwm() - (base if before <= base + 1 else before), float(loss), float(a.grad.abs().sum()))
"""


def test_memory_stays_linear_at_32k_by_32k():
    """N = N⁻ = 32768, D = 64 forward+backward on `cpu` under 256 MiB extra peak (the
    materialised matrix alone would be 4 GiB), in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEMORY_CHILD)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak, loss, grad = map(float, out.stdout.split())
    assert 0 < loss < 100 and grad > 0
    assert peak < 256, f"peak extra {peak:.0f} MiB"
