"""cross_layer_alignment_loss (RA-BUSSeg CRA): the op contract, the reference against the
formula written out, peaked distributions, global alignment, the blocked kernels' block sizes and
the CPU's float products."""

import importlib

import pytest
import torch
from conftest import backends, tolerance, triton_device
from hypothesis import strategies as st
from matmul_precision import TF32_EPS, every_precision, matmul_precision, to_tf32
from op_contract import OpContract, RawSample, bad

import busseg_ops
from busseg_ops import cross_layer_alignment_loss as cra_loss
from busseg_ops.ops.cross_layer_alignment_loss import OP

_ops = torch.ops.busseg

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
    """The loss written out: mean over pairs of sum q (log q - log(p + eps)) / d."""
    P = [torch.einsum("bchw,bmc->bhwm", f, p).softmax(-1) for f, p in zip(feats, proxies)]
    B, H, W, M = P[0].shape
    d = {"mean": B * H * W * M, "batchmean": B, "sum": 1}[reduction]
    kls = [(q * (q.log() - (p + eps).log())).sum() / d for p, q in zip(P, P[1:])]
    return sum(kls) / len(kls)


def _raw_args():
    f, p = [torch.randn(2, 3, 12)] * 2, [torch.randn(2, 5, 3)] * 2
    return f, p


def _raw(**changes):
    f, p = _raw_args()
    args = dict(feats=f, proxies=p, reduction="mean", eps=1e-10, block_rows=4)
    args.update(changes)
    return lambda: _ops.cross_layer_alignment_loss(
        args["feats"], args["proxies"], args["reduction"], args["eps"], args["block_rows"], False
    )


def _raw_backward(**changes):
    f, p = _raw_args()
    args = dict(grad_loss=torch.tensor(1.0), lse=torch.randn(2, 2, 12))
    args.update(changes)
    return lambda: _ops.cross_layer_alignment_loss_backward(
        args["grad_loss"], f, p, args["lse"], "sum", 1e-10, 4, True, True
    )


class TestCrossLayerAlignmentLoss(OpContract):
    op = OP
    cases = [
        (case, reduction, grad)
        for case in LOSS_CASES
        for reduction in ["mean", "batchmean", "sum"]
        for grad in [(True, True), (False, True), (True, False)]
    ]

    def gradcheck_params(self):
        # float64 on cpu and reference; one small case through the Triton interpreter
        return [(b, r) for b in ("cpu", "reference") for r in ("mean", "sum")] + [("triton", "sum")]

    def make_inputs(self, case, device):
        shape, reduction, grad, *dtype = case
        feats, proxies = make_loss_inputs(shape, (dtype or [torch.float32])[0], device, grad, scale=1.5)
        return feats, proxies, reduction

    def call(self, feats, proxies, reduction):
        return cra_loss(feats, proxies, reduction)

    def grad_tolerance(self, dtype, expected):
        # "sum" gradients are large and the KL gradient cancels: atol relative to their size
        tol = tolerance(dtype)
        return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, expected.abs().max().item()))

    def runs_case(self, backend, device, case):
        shape, reduction, grad = case[:3]
        # the interpreter is slow: a spread of cases
        return (
            backend != "triton"
            or device != "cpu"
            or (LOSS_CASES.index(shape) + len(reduction) + grad.count(True)) % 3 == 0
        )

    def property_case(self):
        return st.tuples(
            st.integers(1, 2),
            st.integers(1, 6),
            st.integers(1, 6),
            st.integers(1, 20),
            st.lists(st.integers(1, 6), min_size=2, max_size=4),
            st.sampled_from(["mean", "batchmean", "sum"]),
            st.sampled_from([(True, True), (False, True), (True, False)]),
            st.sampled_from([torch.float32, torch.float64]),
        ).map(lambda c: ((c[0], c[1], c[2], c[3], tuple(c[4])), c[5], c[6], c[7]))

    def gradcheck_inputs(self, reduction, backend):
        feats, proxies = make_loss_inputs((1, 2, 3, 4, (2, 3)) if backend == "triton" else (2, 3, 4, 5, (2, 3, 4)))
        n = len(feats)
        return (lambda *t: cra_loss(list(t[:n]), list(t[n:]), reduction, 1e-3)), (*feats, *proxies)

    def compile_inputs(self):
        feats, proxies = make_loss_inputs((2, 5, 4, 6, (3, 4, 5)), dtype=torch.float32)
        return (lambda *t: cra_loss(list(t[:3]), list(t[3:]))), (*feats, *proxies)

    def nan_inputs(self):
        feats, proxies = make_loss_inputs((1, 3, 3, 4, (2, 2)), grad=(False, False))
        feats[0][0, 0, 1, 1] = float("nan")
        return feats, proxies, "mean"

    def check_nan(self, out, inputs):
        assert out.isnan()

    def layout_inputs(self):
        feats, proxies = make_loss_inputs((2, 5, 6, 7, (3, 4)), dtype=torch.float32, grad=(False, False))
        return feats, proxies, "mean"

    def bad_input_args(self):
        feats = [torch.randn(2, 3, 4, 5), torch.randn(2, 4, 4, 5)]
        proxies = [torch.randn(2, 5, 3), torch.randn(2, 5, 4)]
        return feats, proxies

    bad_inputs = [
        bad(lambda f, p: cra_loss(f[:1], p[:1]), ValueError, "feats must be a list of L >= 2"),
        bad(lambda f, p: cra_loss(f[0], p), ValueError, "feats must be a list of L >= 2"),
        bad(lambda f, p: cra_loss([f[0], f[1][:, :, :2]], p), ValueError, r"feats\[0\] and feats\[1\] must share"),
        bad(
            lambda f, p: cra_loss([f[0], f[1].double()], p),
            TypeError,
            r"feats\[0\] and feats\[1\] must have the same dtype",
        ),
        bad(lambda f, p: cra_loss(f, p[:1]), ValueError, "proxies must be a list of L = 2"),
        bad(
            lambda f, p: cra_loss(f, [p[0], p[1][:, :, :2]]),
            ValueError,
            r"proxies\[1\] must be \(B, M, C_l\) = \(2, 5, 4\)",
        ),
        bad(lambda f, p: cra_loss(f, [p[0], p[1][:, :3]]), ValueError, r"proxies\[1\] must be \(B, M, C_l\)"),
        bad(lambda f, p: cra_loss(f, [p[0], p[1][0]]), ValueError, r"proxies\[1\] must have 3 dims"),
        bad(lambda f, p: cra_loss(f, p, reduction="none"), ValueError, "reduction must be one of"),
        bad(lambda f, p: cra_loss(f, p, eps=-1.0), ValueError, "eps must be a finite float >= 0, got -1.0"),
        # scalars (issue 29): eps = inf gave a loss of -inf; a bool is no number
        bad(lambda f, p: cra_loss(f, p, eps=float("inf")), ValueError, "eps must be a finite float >= 0, got inf"),
        bad(lambda f, p: cra_loss(f, p, eps=float("nan")), ValueError, "eps must be a finite float >= 0, got nan"),
        bad(lambda f, p: cra_loss(f, p, eps=True), TypeError, "eps must be a float, got bool"),
        bad(lambda f, p: cra_loss(f, p, eps="1e-10"), TypeError, "eps must be a float, got str"),
        bad(lambda f, p: cra_loss([f[0][:, :, :0], f[1][:, :, :0]], p), ValueError, r"feats\[0\] is empty"),
        bad(lambda f, p: cra_loss([f[0].long(), f[1]], p), TypeError, r"feats\[0\] must be one of"),
    ]

    raw_bad_inputs = [
        bad(_raw(feats=_raw_args()[0][:1], proxies=_raw_args()[1][:1]), ValueError, "L >= 2 layers"),
        bad(_raw(feats=[]), ValueError, "L >= 2 layers"),
        bad(_raw(reduction="none"), ValueError, "reduction must be 'mean', 'batchmean' or 'sum'"),
        bad(_raw(block_rows=0), ValueError, "block_rows must be >= 1"),
        bad(_raw(eps=-1.0), ValueError, "eps must be >= 0"),
        bad(
            _raw(proxies=[torch.randn(2, 5, 3), torch.randn(2, 4, 3)]),
            ValueError,
            r"proxies\[1\] must be \(B, M, C_l\) = \(2, 5, 3\)",
        ),
        bad(_raw(feats=[torch.randn(2, 3, 12), torch.randn(2, 3, 11)]), ValueError, r"feats\[1\] must be"),
        bad(_raw(feats=[torch.ones(2, 3, 12, dtype=torch.int32)] * 2), TypeError, "feats\\[0\\] must be float32"),
        bad(_raw(feats=[torch.randn(2, 3, 12), torch.randn(2, 3, 12, device="meta")]), ValueError, "device"),
        bad(_raw_backward(lse=torch.randn(2, 2)), ValueError, r"lse must be \(L, B, HW\)"),
        bad(_raw_backward(grad_loss=torch.ones(2)), ValueError, "grad_loss must be a scalar"),
        bad(_raw_backward(lse=torch.randn(2, 2, 12, device="meta")), ValueError, "device"),
        bad(_raw_backward(grad_loss=torch.tensor(1)), TypeError, "grad_loss must be float32"),
    ]

    def raw_samples(self):
        feats, proxies = make_loss_inputs((2, 3, 4, 5, (2, 3, 4)))
        flat = [f.flatten(2) for f in feats]
        forward = [
            RawSample(OP.name, (flat, proxies, reduction, 1e-10, rows, grad_proxies), free={(4, "huge")})
            for reduction, rows, grad_proxies in (("mean", 5, False), ("batchmean", 12, True), ("sum", 64, True))
        ]
        _, lse, _ = _ops.cross_layer_alignment_loss(flat, proxies, "mean", 1e-10, 5, False)
        detached = ([f.detach() for f in flat], [p.detach() for p in proxies])
        backward = [
            RawSample(
                f"{OP.name}_backward",
                (torch.tensor(1.5, dtype=torch.float64), *detached, lse, "sum", 1e-4, 5, *need),
                free={(0, "rank"), (6, "huge")},
            )
            for need in ((True, True), (False, True), (True, False))
        ]
        return forward + backward


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
def test_reference_loss_matches_the_formula(reduction):
    feats, proxies = make_loss_inputs(LOSS_CASES[2])
    with busseg_ops.use_backend("reference"):
        loss = cra_loss(feats, proxies, reduction, eps=1e-6)
    torch.testing.assert_close(loss, literal_loss(feats, proxies, reduction, 1e-6))


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


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_triton_rows_wider_than_a_tile(scale):
    """More proxies than one Triton tile (busseg_ops.triton.cross_layer_alignment_loss._TILE): the
    wide kernels stream each row in chunks (one tile of 4096 spilled registers on sm_80/sm_90).
    scale 4: peaked rows, where probabilities underflow and eps matters."""
    device = triton_device()
    from busseg_ops.triton.cross_layer_alignment_loss import _TILE

    feats, proxies = make_loss_inputs((1, 2, 3, _TILE + 37, (3, 4, 2)), device=device, scale=scale)
    ref, ref_grads = loss_and_grads("reference", feats, proxies, eps=1e-6)
    loss, grads = loss_and_grads("triton", feats, proxies, eps=1e-6)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_global_alignment(backend, monkeypatch):
    feats, _ = make_loss_inputs((2, 3, 4, 1, (2, 3, 5)))
    every_pixel = [f.flatten(2).transpose(1, 2) for f in feats]
    with busseg_ops.use_backend(backend):
        loss = cra_loss(feats)
        torch.testing.assert_close(loss, cra_loss(feats, every_pixel))
        front_end = importlib.import_module("busseg_ops.ops.cross_layer_alignment_loss")
        monkeypatch.setattr(front_end, "_available_bytes", lambda device: 10_000)
        with pytest.raises(
            RuntimeError,
            match=r"global alignment .* needs about 0.0 MiB for the "
            r"\(L, B, HW, HW\) = \(3, 2, 12, 12\) logits",
        ):
            cra_loss(feats)


@pytest.mark.parametrize("namespace", ["busseg", "busseg_triton"])
@pytest.mark.parametrize("rows", [1, 5, 12, 1000])
@pytest.mark.parametrize("grad", [(True, True), (False, True)])
def test_blocked_loss_any_block_rows(namespace, rows, grad):
    # blocks that do and do not divide HW = 12, and one block larger than HW; proxy gradients
    # recomputed in backward, or formed in forward (only the proxies need a gradient); the Triton
    # launchers follow the same blocked contract
    if namespace == "busseg_triton" and ("triton" not in busseg_ops.available_backends("cpu") or rows in (1, 12)):
        pytest.skip("triton not available here" if rows not in (1, 12) else "the interpreter is slow: two block sizes")
    op = getattr(getattr(torch.ops, namespace), OP.name)
    feats, proxies = make_loss_inputs((2, 3, 4, 5, (2, 3, 4)), grad=grad)
    flat = [f.flatten(2) for f in feats]
    inputs = [t for t in feats + proxies if t.requires_grad]
    loss, _, unit = op(flat, proxies, "sum", 1e-4, rows, not grad[0])
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
    loss, _, _ = _ops.cross_layer_alignment_loss(
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


def test_cpu_fast_exp_log_accuracy():
    # float rows use polynomial exp/log: compare one row's loss and gradient against float64
    z = torch.linspace(-30, 30, 64)
    feats = [torch.ones(1, 1, 1), torch.ones(1, 1, 1)]
    proxies = [z.reshape(1, 64, 1), z.flip(0).reshape(1, 64, 1) * 0.5]
    loss, _, _ = _ops.cross_layer_alignment_loss(feats, proxies, "sum", 1e-10, 1, False)
    ref, _, _ = _ops.cross_layer_alignment_loss(
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


# ---- the tensor-core kernels (Triton fused; CUDA on a GPU) in every precision against float64 ---

#: (B, H, W, M, channels per layer): every path of the Triton launchers (test_kernel_paths_are_covered
#: checks which): fused tiles of 16, 32 and 64 proxies (M off the tile), two fused row programs per
#: image with a ragged last one, channel counts of 1 and past several chunks with a tail, all four
#: layer slots; the blocked path for five layers and for 65 proxies.
KERNEL_CASES = {
    "layer widths, ragged rows": (2, 9, 8, 7, (1, 33, 300, 64)),
    "three layers": (1, 5, 13, 20, (8, 5, 16)),
    "64-proxy tiles": (1, 4, 17, 60, (16, 40)),
    "five layers (blocked)": (1, 3, 5, 6, (2, 3, 2, 4, 5)),
    "65 proxies (blocked)": (1, 3, 4, 65, (4, 6)),
}


def kernel_inputs(case, device="cpu", dtype=torch.float64):
    """Maps and proxies whose logits have a standard deviation of about 1.5 whatever C_l (unit
    variance per channel would make them peaked beyond float16's reach at C_l = 300)."""
    B, H, W, M, chans = case
    feats = [torch.randn(B, c, H, W, device=device, dtype=dtype) * c**-0.25 for c in chans]
    proxies = [1.5 * torch.randn(B, M, c, device=device, dtype=dtype) * c**-0.25 for c in chans]
    return feats, proxies


def kernel_loss_and_grads(op, feats, proxies, reduction, grad, block_rows):
    """A raw op (native or Triton) with autograd: loss and gradients of the inputs that want one;
    with only the proxies wanting one, forward forms them (grad_proxies)."""
    feats = [f.detach().requires_grad_(grad[0]) for f in feats]
    proxies = [p.detach().requires_grad_(grad[1]) for p in proxies]
    loss, _, _ = op([f.flatten(2) for f in feats], proxies, reduction, 1e-6, block_rows, not grad[0])
    leaves = [t for t in feats + proxies if t.requires_grad]
    return loss, torch.autograd.grad(loss, leaves)


def kernel_tolerance(dtype, precision, expected):
    """What a kernel result may differ by from float64 on the same inputs, relative to the result's
    size (the KL gradients cancel): the dtype's tolerance; in TF32 (10 mantissa bits) a few units
    of TF32_EPS in the loss and 16 in the gradients, whose error grows with the logits' size
    (test_tf32_tolerance_covers_emulated_tf32 measures about 2 TF32_EPS at these inputs' logits
    of standard deviation 1.5, up to 5 at 18)."""
    scale = max(1.0, expected.abs().max().item())
    if dtype == torch.float32 and precision == "tf32":
        units = 4 if expected.dim() == 0 else 16
        return dict(rtol=units * TF32_EPS, atol=units * TF32_EPS * scale)
    tol = tolerance(dtype)
    return dict(rtol=tol["rtol"], atol=tol["atol"] * scale)


def _gpu_or_triton_ops():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    namespaces = [("busseg", "cuda")] if device == "cuda" else []
    if "triton" in busseg_ops.available_backends(device):
        namespaces.append(("busseg_triton", "triton"))
    return [pytest.param(device, ns, id=f"{device}-{backend}") for ns, backend in namespaces]


@pytest.mark.parametrize("grad", [(True, True), (False, True)], ids=["all", "proxies"])
@every_precision
@pytest.mark.parametrize("case", list(KERNEL_CASES))
@pytest.mark.parametrize("device,namespace", _gpu_or_triton_ops())
def test_kernels_match_float64(device, namespace, case, dtype, precision, grad):
    """The Triton kernels (and on a GPU the CUDA ones) on every path against the float64 reference
    on the same rounded inputs, in blocks of 40 pixel rows (several per image), in every precision:
    float32 exact and in TF32 as PyTorch's matmul precision says (the interpreter runs tl.dot
    exactly: there TF32 is the exact result through the TF32 launch configuration, held to the
    float32 tolerance), float16 and bfloat16 with float32 accumulation, float64."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's tl.dot misreads bfloat16 (numpy has none); the GPU runs it")
    feats, proxies = kernel_inputs(KERNEL_CASES[case], device, dtype)
    op = getattr(getattr(torch.ops, namespace), OP.name)
    wide = [t.double() for t in feats], [t.double() for t in proxies]
    ref, ref_grads = kernel_loss_and_grads(_ops.cross_layer_alignment_loss, *wide, "sum", grad, 40)
    with matmul_precision(precision):
        loss, grads = kernel_loss_and_grads(op, feats, proxies, "sum", grad, 40)
    rounding = "ieee" if device == "cpu" else precision  # what the products really did
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.to(device), **kernel_tolerance(dtype, rounding, ref))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r.to(device), **kernel_tolerance(dtype, rounding, r))


@pytest.mark.parametrize("grad", [(True, True), (False, True)], ids=["all", "proxies"])
def test_fused_kernel_gradcheck(monkeypatch, grad):
    """gradcheck in float64 of the fused kernel itself (the launchers give it only tensor-core
    dtypes; the interpreter runs it in float64 too): two row programs per image, the second
    ragged, a channel tail, backward in two blocks of rows; with only the proxies wanting a
    gradient, the ones forward forms."""
    if triton_device() != "cpu":
        pytest.skip("forces the fused kernel in float64: the interpreter's check (the GPU spills it)")
    from busseg_ops.triton import cross_layer_alignment_loss as kernels

    monkeypatch.setattr(kernels, "_fused", lambda feats, proxies: True)
    feats, proxies = kernel_inputs((1, 5, 14, 5, (2, 17, 3)))
    feats = [f.flatten(2).requires_grad_(grad[0]) for f in feats]
    proxies = [p.requires_grad_(grad[1]) for p in proxies]
    op = torch.ops.busseg_triton.cross_layer_alignment_loss

    def loss(*wanted):
        it = iter(wanted)
        f = [next(it) if grad[0] else t for t in feats]
        return op(f, [next(it) for _ in proxies], "sum", 1e-3, 40, not grad[0])[0]

    inputs = (*feats, *proxies) if grad[0] else tuple(proxies)
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


@pytest.mark.parametrize("scale", [1.0, "unit channels"])
@pytest.mark.parametrize("case", list(KERNEL_CASES)[:3])
def test_tf32_tolerance_covers_emulated_tf32(case, scale):
    """The TF32 tolerance of test_kernels_match_float64 against TF32 emulated on the CPU: the float64
    reference on maps and proxies whose mantissas are cut to TF32's 10 bits (exactly what the
    tensor cores read: the logits' operands are the inputs themselves) stays within it, and differs
    from it; also with unit-variance channels (logits of standard deviation up to 17 here)."""
    feats, proxies = kernel_inputs(KERNEL_CASES[case])
    if scale == "unit channels":
        feats = [f * f.shape[1] ** 0.25 for f in feats]
        proxies = [p * p.shape[2] ** 0.25 / 1.5 for p in proxies]
    exact, exact_grads = kernel_loss_and_grads(_ops.cross_layer_alignment_loss, feats, proxies, "sum", (True, True), 40)
    rounded = [to_tf32(f) for f in feats], [to_tf32(p) for p in proxies]
    loss, grads = kernel_loss_and_grads(_ops.cross_layer_alignment_loss, *rounded, "sum", (True, True), 40)
    assert loss != exact
    torch.testing.assert_close(loss, exact, **kernel_tolerance(torch.float32, "tf32", exact))
    for g, r in zip(grads, exact_grads):
        torch.testing.assert_close(g, r, **kernel_tolerance(torch.float32, "tf32", r))


def test_kernel_paths_are_covered():
    """KERNEL_CASES take every path of the Triton launchers: fused tiles of 16, 32 and 64 proxies
    (4 and 8 warps), ragged fused row programs, channel chunks with a tail, all layer slots, and
    the blocked path for too many layers, for too many proxies and for exact products (float32
    without TF32, float64)."""
    from busseg_ops.triton import cross_layer_alignment_loss as kernels

    seen = set()
    for B, H, W, M, chans in KERNEL_CASES.values():
        feats, proxies = kernel_inputs((B, H, W, M, chans), dtype=torch.float32)
        with matmul_precision("ieee"):
            seen |= {"blocked: exact"} if not kernels._fused(feats, proxies) else set()
        with matmul_precision("tf32"):
            fused = kernels._fused(feats, proxies)
        if not fused:
            seen.add("blocked: layers" if len(chans) > kernels._MAX_LAYERS else "blocked: proxies")
            continue
        seen.add(f"fused tile of {max(16, 1 << (M - 1).bit_length())}")
        seen |= {"ragged rows"} if (H * W) % kernels._FUSED_ROWS else set()
        chunk = kernels._FUSED_CHANNELS
        seen |= {"channel tail"} if any(c > chunk and c % chunk for c in chans) else set()
        seen |= {"all slots"} if len(chans) == kernels._MAX_LAYERS else set()
    assert seen == {
        "fused tile of 16",
        "fused tile of 32",
        "fused tile of 64",
        "ragged rows",
        "channel tail",
        "all slots",
        "blocked: layers",
        "blocked: proxies",
        "blocked: exact",
    }


def test_triton_precision_follows_pytorch(monkeypatch):
    """The fused kernel's logits are TF32 exactly when PyTorch's float32 matmuls may be, read on
    every call (busseg_ops/triton/_precision.py; the contrastive tests cover the API forms)."""
    from busseg_ops.triton import cross_layer_alignment_loss as kernels

    seen = []
    original = kernels.dot_precision
    monkeypatch.setattr(kernels, "dot_precision", lambda dtype: seen.append(original(dtype)) or seen[-1])
    device = triton_device()
    feats, proxies = kernel_inputs(KERNEL_CASES["64-proxy tiles"], device, torch.float32)
    for precision in ("ieee", "tf32", "ieee"):  # the blocked path, then the fused kernel
        seen.clear()
        with matmul_precision(precision):
            torch.ops.busseg_triton.cross_layer_alignment_loss(
                [f.flatten(2) for f in feats], proxies, "sum", 1e-6, 40, False
            )
        assert seen and set(seen) == {precision}
