"""adjacent_relation_propagation (RA-BUSSeg ARP): the op contract, and the reference against the
upstream unfold formulation."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import backends, devices, tolerance, triton_device
from hypothesis import strategies as st
from op_contract import OpContract, RawSample, bad, channels_last, strided

import busseg_ops
from busseg_ops import adjacent_relation_propagation as arp
from busseg_ops._validate import MAX_EXTENT
from busseg_ops.ops.adjacent_relation_propagation import MAX_KERNEL_SIZE, OP, check_args

SHAPES = [  # B, C, K, H, W
    (2, 8, 2, 9, 9),
    (1, 5, 2, 7, 12),  # B=1, C not a multiple of 4, H != W
    (3, 3, 3, 6, 5),  # odd W, K=3
    (2, 17, 1, 11, 4),
]
KERNELS = [(1, 1), (3, 1), (3, 3), (5, 2), (7, 1)]  # kernel_size, dilation

_ops = torch.ops.busseg


def run(backend, feat, value, **kw):
    with busseg_ops.use_backend(backend):
        return arp(feat, value, return_weights=True, **kw)


def unfold_arp(feat, value, kernel_size, dilation, scale):
    """The RA-BUSSeg formulation (zeros padding): an independent oracle for the reference."""
    B, C, H, W = feat.shape
    pad = dilation * (kernel_size // 2)
    fu = F.unfold(feat, kernel_size, dilation=dilation, padding=pad).view(B, C, -1, H * W)
    vu = F.unfold(value, kernel_size, dilation=dilation, padding=pad).view(B, value.shape[1], -1, H * W)
    w = (torch.einsum("bcp,bckp->bkp", feat.flatten(2), fu) * scale).softmax(1)
    return torch.einsum("bkp,bvkp->bvp", w, vu).view_as(value), w.view(B, -1, H, W)


def _arp_args(B=2, C=5, K=2, H=6, W=7, kernel_size=3, dilation=2):
    feat = torch.randn(B, C, H, W, dtype=torch.float64)
    value = torch.randn(B, K, H, W, dtype=torch.float64)
    _, w = _ops.adjacent_relation_propagation(feat, value, kernel_size, dilation, 0.4, False)
    grad = torch.randn(B, K, H, W, dtype=torch.float64)
    return feat, value, w, grad


def _raw_backward(**changes):
    feat, value, w, grad = _arp_args()
    args = dict(grad_out=grad, feat=feat, value=value, weights=w)
    args.update(changes)
    return lambda: _ops.adjacent_relation_propagation_backward(
        args["grad_out"], args["feat"], args["value"], args["weights"], 3, 2, 0.4, False, True, True
    )


def _raw_forward(feat_shape=(1, 2, 3, 3), value_shape=(1, 2, 3, 3), kernel_size=3, dilation=1, to=None):
    to = to or {}
    feat = torch.randn(feat_shape).to(**to.get("feat", {}))
    value = torch.randn(value_shape).to(**to.get("value", {}))
    return lambda: _ops.adjacent_relation_propagation(feat, value, kernel_size, dilation, 1.0, False)


class TestAdjacentRelationPropagation(OpContract):
    op = OP
    # every shape x kernel x padding x value gradient in float32, and one case in float64
    cases = [
        (shape, kd, padding, value_grad, torch.float32)
        for shape, kd, padding, value_grad in itertools.product(SHAPES, KERNELS, ["zeros", "valid"], [True, False])
    ] + [(SHAPES[2], (3, 2), "valid", True, torch.float64)]
    gradcheck_cases = ["zeros", "valid"]
    gradcheck_backends = ("cpu", "reference", "triton")
    layout_exact = ("channels_last",)
    half_case = (SHAPES[0], (3, 1), "valid", True, torch.float32)  # a 3x3 kernel, both gradients

    def make_inputs(self, case, device):
        (B, C, K, H, W), (kernel_size, dilation), padding, value_grad, dtype, *magnitude = case
        feat = (torch.randn(B, C, H, W, device=device, dtype=dtype) * (magnitude or [1])[0]).requires_grad_()
        value = torch.randn(B, K, H, W, device=device, dtype=dtype, requires_grad=value_grad)
        return feat, value, kernel_size, dilation, padding

    def case_tolerance(self, case, dtype):
        # Features of size m make logits of size about C·m², whose float32 rounding (C·m²·eps) the
        # softmax passes on to the weights and the output: at m = 30 (a property case) the kernel
        # was 1.1e-5 from float64, the float32 reference 2.1e-5, and they were 3.2e-5 apart.
        (_, C, *_), _, _, _, _, *magnitude = case
        tol = dict(self.tolerance(dtype))
        tol["atol"] = max(tol["atol"], 4 * C * (magnitude or [1])[0] ** 2 * torch.finfo(dtype).eps)
        return tol

    def call(self, feat, value, kernel_size, dilation, padding):
        return arp(feat, value, kernel_size, dilation, padding=padding, return_weights=True)

    def grad_outputs(self, out):
        return [out[0]]  # the weights are not differentiable

    def runs_case(self, backend, device, case):
        # the interpreter is slow: a spread of cases, not the whole grid
        shape, (kernel_size, _), padding = case[:3]
        return (
            backend != "triton"
            or device != "cpu"
            or (SHAPES.index(shape) + kernel_size + (padding == "valid")) % 3 == 0
        )

    def property_case(self):
        return st.fixed_dictionaries(
            {
                "B": st.integers(1, 3),
                "C": st.integers(1, 9),
                "K": st.integers(1, 3),
                "H": st.integers(1, 10),
                "W": st.integers(1, 10),
                "kernel_size": st.sampled_from([1, 3, 5, 7]),
                "dilation": st.integers(1, 4),
                "padding": st.sampled_from(["zeros", "valid"]),
                "magnitude": st.sampled_from([1e-3, 1.0, 30.0]),
                "dtype": st.sampled_from([torch.float32, torch.float64]),
            }
        ).map(
            lambda c: (
                (c["B"], c["C"], c["K"], c["H"], c["W"]),
                (c["kernel_size"], c["dilation"]),
                c["padding"],
                True,
                c["dtype"],
                c["magnitude"],
            )
        )

    def gradcheck_inputs(self, padding, backend):
        # the interpreter runs a kernel in a third of a second: fewer pixels for Triton
        B, C, K, H, W = (1, 2, 1, 4, 3) if backend == "triton" else (2, 3, 2, 5, 4)
        feat = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
        value = torch.randn(B, K, H, W, dtype=torch.float64, requires_grad=True)
        return (lambda f, v: arp(f, v, 3, 2, padding=padding)), (feat, value)

    def compile_inputs(self):
        feat = torch.randn(2, 6, 9, 7, requires_grad=True)
        value = torch.randn(2, 2, 9, 7, requires_grad=True)
        return (lambda f, v: arp(f, v, 3, 2).square().sum()), (feat, value)

    def nan_inputs(self):
        feat, value = torch.randn(1, 3, 5, 5), torch.randn(1, 2, 5, 5)
        feat[0, 0, 2, 2] = float("nan")
        return feat, value, 3, 1, "zeros"

    def check_nan(self, out, inputs):
        out = out[0]
        assert out[0, :, 2, 2].isnan().all() and not out[0, :, 0, 0].isnan().any()

    def layout_inputs(self):
        return torch.randn(2, 6, 7, 9), torch.randn(2, 2, 7, 9), 3, 1, "zeros"

    def bad_input_args(self):
        return torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)

    bad_inputs = [
        bad(lambda f, v: arp(f[0], v), ValueError, "feat must have 4 dims"),
        bad(lambda f, v: arp(f, v[:, :, :3]), ValueError, "feat and value must share sizes"),
        bad(lambda f, v: arp(f, v[:1]), ValueError, "feat and value must share sizes at dims"),
        bad(lambda f, v: arp(f.long(), v), TypeError, "feat must be one of float32, float64"),
        bad(lambda f, v: arp(f, v.double()), TypeError, "feat and value must have the same dtype"),
        bad(lambda f, v: arp(f, v, kernel_size=4), ValueError, "kernel_size must be odd"),
        bad(lambda f, v: arp(f, v, kernel_size=0), ValueError, "kernel_size must be >= 1"),
        bad(lambda f, v: arp(f, v, kernel_size=3.0), TypeError, "kernel_size must be an int"),
        bad(lambda f, v: arp(f, v, dilation=0), ValueError, "dilation must be >= 1"),
        bad(lambda f, v: arp(f, v, padding="reflect"), ValueError, "padding must be one of"),
        bad(lambda f, v: arp(f[:, :0], v), ValueError, "feat is empty"),
        bad(lambda f, v: arp(f.numpy(), v), TypeError, "feat must be a torch.Tensor"),
        # sizes whose index arithmetic would overflow: rejected, never a wrong result
        bad(lambda f, v: arp(f, v, kernel_size=2**63 - 1), ValueError, f"kernel_size must be <= {MAX_KERNEL_SIZE}"),
        bad(lambda f, v: arp(f, v, kernel_size=2**64 + 1), ValueError, f"kernel_size must be <= {MAX_KERNEL_SIZE}"),
        bad(lambda f, v: arp(f, v, dilation=2**62 + 1), ValueError, r"dilation \* \(kernel_size // 2\)"),
        bad(lambda f, v: arp(f, v, kernel_size=3, dilation=MAX_EXTENT + 1), ValueError, r"dilation \* \(kernel_size"),
        # scalars (issue 29): an infinite scale made the CPU and the reference disagree; a bool is no number
        bad(lambda f, v: arp(f, v, scale=float("inf")), ValueError, "scale must be a finite float, got inf"),
        bad(lambda f, v: arp(f, v, scale=-float("inf")), ValueError, "scale must be a finite float, got -inf"),
        bad(lambda f, v: arp(f, v, scale=float("nan")), ValueError, "scale must be a finite float, got nan"),
        bad(lambda f, v: arp(f, v, scale=10**400), ValueError, "scale must be a finite float, got 1000"),
        bad(lambda f, v: arp(f, v, scale=True), TypeError, "scale must be a float, got bool"),
        bad(lambda f, v: arp(f, v, scale="0.5"), TypeError, "scale must be a float, got str"),
        bad(lambda f, v: arp(f, v, scale=torch.tensor(0.5)), TypeError, "scale must be a float, got Tensor"),
        bad(lambda f, v: arp(f, v, kernel_size=True), TypeError, "kernel_size must be an int, got bool"),
        bad(lambda f, v: arp(f, v, dilation=True), TypeError, "dilation must be an int, got bool"),
    ]

    raw_bad_inputs = [
        bad(_raw_forward(kernel_size=2), ValueError, "kernel_size must be odd"),
        bad(_raw_forward(kernel_size=2**63 - 1), ValueError, "kernel_size must be odd and in"),
        bad(_raw_forward(dilation=2**62 + 1), ValueError, r"dilation \* \(kernel_size // 2\) must be <= 2\^30"),
        bad(_raw_forward(dilation=0), ValueError, "dilation must be >= 1"),
        bad(_raw_forward(value_shape=(2, 2, 3, 3)), ValueError, "must share batch and spatial sizes"),
        bad(_raw_forward(feat_shape=(1, 2, 3)), ValueError, "feat must have 4 dims"),
        bad(
            _raw_forward(to={"feat": {"dtype": torch.int32}}),
            TypeError,
            "feat must be float32, float64, float16 or bfloat16",
        ),
        # a meta tensor takes the call to the fake kernel, which checks the contract
        bad(_raw_forward(to={"value": {"device": "meta"}}), ValueError, "feat and value must be on the same device"),
        bad(_raw_forward(to={"feat": {"device": "meta"}}), ValueError, "feat and value must be on the same device"),
        # a grad_out of the wrong shape once read out of bounds (garbage at 256², SIGSEGV at 1024²)
        bad(_raw_backward(grad_out=torch.randn(2, 2, 3, 3, dtype=torch.float64)), ValueError, r"grad_out must be"),
        bad(_raw_backward(grad_out=torch.randn(2, 3, 6, 7, dtype=torch.float64)), ValueError, r"grad_out must be"),
        bad(_raw_backward(weights=torch.randn(2, 9, 6, 6, dtype=torch.float64)), ValueError, r"weights must be"),
        bad(_raw_backward(grad_out=torch.randn(2, 2, 6, 7)), TypeError, "grad_out must have feat's dtype"),
        bad(_raw_backward(weights=torch.randn(2, 9, 6, 7, dtype=torch.float64, device="meta")), ValueError, "device"),
    ]

    def raw_samples(self):
        feat, value, w, grad = _arp_args()
        f, v = feat.clone().requires_grad_(), value.clone().requires_grad_()
        return [
            RawSample(OP.name, (f, v, 3, 2, 0.4, False), free={(0, "dim", 1), (1, "dim", 1)}),
            RawSample(OP.name, (f, v, 5, 1, 0.4, True), free={(0, "dim", 1), (1, "dim", 1)}),
            RawSample(
                f"{OP.name}_backward", (grad, feat, value, w, 3, 2, 0.4, False, True, True), free={(1, "dim", 1)}
            ),
            RawSample(
                f"{OP.name}_backward", (grad, feat, value, w, 3, 2, 0.4, False, True, False), free={(1, "dim", 1)}
            ),
        ]

    def triton_opcheck_samples(self):
        feat, value, w, grad = _arp_args()
        return [
            RawSample(OP.name, (feat.clone().requires_grad_(), value.clone().requires_grad_(), 3, 2, 0.4, False)),
            RawSample(f"{OP.name}_backward", (grad, feat, value, w, 3, 2, 0.4, True, True, True)),
        ]


@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (3, 1), (3, 2), (5, 3), (7, 1)])
def test_reference_matches_unfold_formulation(kernel_size, dilation):
    feat, value = torch.randn(2, 6, 9, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64)
    with busseg_ops.use_backend("reference"):
        out, w = arp(feat, value, kernel_size, dilation, return_weights=True)
    ref_out, ref_w = unfold_arp(feat, value, kernel_size, dilation, 6**-0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_scale_is_any_finite_real():
    f, v = torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5)
    expected = arp(f, v, scale=2.0)
    assert torch.equal(arp(f, v, scale=2), expected)
    assert torch.equal(arp(f, v, scale=np.float32(2.0)), expected)


def test_only_feat_gradient_when_value_is_detached():
    feat = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: arp(f, value, 5), (feat,))


def test_weights_are_a_distribution_and_zero_outside_for_valid():
    feat, value = torch.randn(1, 4, 5, 5), torch.randn(1, 2, 5, 5)
    _, w = arp(feat, value, 3, padding="valid", return_weights=True)
    torch.testing.assert_close(w.sum(1), torch.ones(1, 5, 5))
    assert torch.all(w[0, :3, 0, :] == 0)  # the top row has no neighbours above
    _, wz = arp(feat, value, 3, padding="zeros", return_weights=True)
    assert torch.all(wz[0, :3, 0, :] > 0)  # zeros padding: outside taps still share the softmax


def test_identical_features_average_the_neighbourhood():
    feat = torch.zeros(1, 3, 6, 6)
    value = torch.randn(1, 2, 6, 6)
    out = arp(feat, value, 3, padding="valid")
    torch.testing.assert_close(out, F.avg_pool2d(value, 3, 1, 1, count_include_pad=False))


def test_reach_beyond_the_map_is_exact():
    """A reach beyond the map is legal (every non-centre tap outside) and matches the reference."""
    feat, value = torch.randn(1, 3, 4, 5, dtype=torch.float64), torch.randn(1, 2, 4, 5, dtype=torch.float64)
    for padding in ("zeros", "valid"):
        expected = run("reference", feat, value, kernel_size=3, dilation=9, padding=padding)
        got = run("cpu", feat, value, kernel_size=3, dilation=9, padding=padding)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (5, 2), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_blocks_and_tap_groups(kernel_size, dilation, dtype):
    """The CPU kernels sum over blocks of 16 consecutive pixels of a plane and groups of at most 9
    taps: interior blocks of wide rows, blocks running from one row into the next, a last block
    overlapping its predecessor (6 * 37 = 13 * 16 + 14), a plane smaller than one block, and more
    taps than a group (5x5, 7x7: groups chained through partial sums), with C not a multiple of
    anything; forward and both gradients against the reference."""
    for H, W in [(6, 37), (5, 11), (2, 3)]:
        feat = torch.randn(2, 19, H, W, dtype=torch.float64).to(dtype)
        value = torch.randn(2, 3, H, W, dtype=torch.float64).to(dtype)
        grad = torch.randn(2, 3, H, W, dtype=torch.float64)
        tol = tolerance(dtype)
        for padding in ("zeros", "valid"):
            kw = dict(kernel_size=kernel_size, dilation=dilation, padding=padding)
            results = []
            for backend, x in (("cpu", dtype), ("reference", torch.float64)):
                f, v = feat.to(x).requires_grad_(), value.to(x).requires_grad_()
                out, w = run(backend, f, v, **kw)
                results.append([out, w, *torch.autograd.grad(out, (f, v), grad.to(x))])
            for got, expected in zip(*results):
                torch.testing.assert_close(got.double(), expected, **tol)


# Shapes that reach every path of the CUDA kernels (csrc/adjacent_relation_propagation/cuda.cu: tiles
# of 16×8 lattice pixels, 8 channels a stage): B, C, K, H, W, kernel_size, dilation.
KERNEL_PATHS = [
    (2, 19, 3, 29, 37, 3, 1),  # interior tiles, partial ones on the right and below, odd W, C % 8 = 3
    (1, 9, 5, 17, 20, 5, 1),  # W a multiple of 4, a 5×5 kernel, three rows of tiles
    (2, 6, 2, 10, 9, 3, 2),  # dilation 2: four lattices, strided rows copied element by element
    (1, 6, 3, 12, 21, 5, 2),  # 5×5 on lattices
    (1, 5, 2, 4, 5, 3, 9),  # the reach beyond the map: every lattice a single pixel
    (1, 3, 2, 2, 3, 5, 1),  # a map smaller than the halo
    (1, 7, 2, 6, 5, 1, 4),  # a 1×1 kernel (its dilation changes nothing)
    (1, 4, 2, 9, 18, 7, 2),  # 7×7: the general path
    # more stages than the pipeline's buffers, so each buffer is refilled after it was read
    (1, 43, 2, 11, 19, 3, 1),  # 6 stages of 8 channels in 3 buffers
    (1, 37, 2, 9, 21, 5, 1),  # 5×5: 10 stages of 4 in 3 buffers (float32), 5 of 8 in 2 (half)
    (1, 35, 2, 7, 9, 1, 1),  # 1×1: 5 stages of 8 in 3 buffers
    (1, 27, 2, 9, 10, 3, 3),  # lattices, 4 stages copied element by element
]
# On a GPU also: the benchmarked shape (B=8, C=256, 65×65, 3×3: 32 stages, 360 tiles) and a 5×5
# kernel on a map that is a multiple of no tile.
KERNEL_PATHS_GPU = [(8, 256, 3, 65, 65, 3, 1), (2, 130, 4, 61, 67, 5, 1)]


def _device_backends():
    """(device, backend) pairs here; the Triton interpreter's CPU runs are covered by the contract."""
    return [(d, b) for d in devices() for b in backends(d, exclude=("triton",) if d == "cpu" else ())]


def _offset_by_one(t: torch.Tensor) -> torch.Tensor:
    """t's values in a contiguous tensor that starts one element into its storage (rows not 16-byte
    aligned), as a leaf that requires grad."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = storage[1:].view(t.shape).copy_(t)
    assert out.is_contiguous() and out.storage_offset() == 1
    return out.requires_grad_()


@pytest.mark.parametrize("device,backend", _device_backends())
@pytest.mark.parametrize("case", KERNEL_PATHS, ids=str)
def test_kernel_paths(device, backend, case):
    """Every backend here against the float64 reference, forward and both gradients, both
    paddings, in float32, float64 and (on a GPU) float16 and bfloat16, on shapes that reach every
    path of the CUDA kernels (KERNEL_PATHS); feat starts one element into its storage, so its rows
    are not 16-byte aligned (the CUDA kernels copy the 16-byte chunks around them)."""
    compare_with_reference(device, backend, case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in busseg_ops.available_backends("cuda")])
@pytest.mark.parametrize("case", KERNEL_PATHS_GPU, ids=str)
def test_kernel_paths_at_size(backend, case):
    """The GPU backends on full-size maps (KERNEL_PATHS_GPU), as test_kernel_paths."""
    compare_with_reference("cuda", backend, case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (3, 1), (3, 2), (5, 1), (7, 3)])
@pytest.mark.parametrize("padding", ["zeros", "valid"])
def test_cuda_gradcheck(kernel_size, dilation, padding):
    """gradcheck of the CUDA backend in float64 (its general kernels; the tiled float32 and half
    ones meet the float64 reference's gradients in test_kernel_paths), on an odd map."""
    feat = torch.randn(2, 5, 7, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    value = torch.randn(2, 3, 7, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    with busseg_ops.use_backend("cuda"):
        assert torch.autograd.gradcheck(lambda f, v: arp(f, v, kernel_size, dilation, padding=padding), (feat, value))


def compare_with_reference(device, backend, case):
    """``backend``'s out, weights and gradients on ``device`` against the float64 reference (see
    test_kernel_paths)."""
    B, C, K, H, W, kernel_size, dilation = case
    dtypes = [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    for dtype, padding in itertools.product(dtypes, ("zeros", "valid")):
        feat = torch.randn(B, C, H, W, device=device).to(dtype)
        value = torch.randn(B, K, H, W, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(B, K, H, W, device=device, dtype=dtype)
        kw = dict(kernel_size=kernel_size, dilation=dilation, padding=padding)
        f = _offset_by_one(feat)
        out, w = run(backend, f, value, **kw)
        got = [out, w, *torch.autograd.grad(out, (f, value), grad)]
        f64, v64 = feat.double().requires_grad_(), value.detach().double().requires_grad_()
        out64, w64 = run("reference", f64, v64, **kw)
        expected = [out64, w64, *torch.autograd.grad(out64, (f64, v64), grad.double())]
        for name, g, e in zip(("out", "weights", "grad_feat", "grad_value"), got, expected):
            assert g.dtype == dtype and g.shape == e.shape, name
            tol = tolerance(dtype)
            tol["atol"] *= max(1.0, e.abs().max().item())
            torch.testing.assert_close(g.double(), e, **tol, msg=f"{backend} {dtype} {padding} {name}")


@pytest.mark.parametrize("device,backend", _device_backends())
def test_layouts_on_every_device(device, backend):
    """Channels-last and strided feat and value on every device (the contract's layout test runs
    on the CPU only): the same outputs and gradients as contiguous inputs."""
    feat = torch.randn(2, 6, 11, 19, device=device)
    value = torch.randn(2, 3, 11, 19, device=device)
    grad = torch.randn(2, 3, 11, 19, device=device)

    def results(f, v):
        f, v = f.detach().requires_grad_(), v.detach().requires_grad_()
        out, w = run(backend, f, v, kernel_size=3, dilation=1)
        return [out, w, *torch.autograd.grad(out, (f, v), grad)]

    expected = results(feat, value)
    for layout in (channels_last, strided):
        for got, e in zip(results(layout(feat), layout(value)), expected):
            torch.testing.assert_close(got, e, **tolerance(torch.float32))


def compare_triton(B, C, K, H, W, kernel_size, dilation, padding, dtype=torch.float64, gradients="both"):
    """Out, weights and the gradients asked for ("both", "feat", "value") of the Triton backend
    against the reference: in float64, or float16 / bfloat16 against the float32 reference on the
    same rounded values (the absolute tolerance relative to the result's size)."""
    device = triton_device()
    feat = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype)
    value = torch.randn(B, K, H, W, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, K, H, W, dtype=torch.float64)
    half = dtype in (torch.float16, torch.bfloat16)
    wide = torch.float32 if half else torch.float64
    results = []
    for backend, x in (("triton", dtype), ("reference", wide)):
        f = feat.to(device, x).requires_grad_(gradients != "value")
        v = value.to(device, x).requires_grad_(gradients != "feat")
        out, w = run(backend, f, v, kernel_size=kernel_size, dilation=dilation, padding=padding)
        leaves = [t for t in (f, v) if t.requires_grad]
        results.append([out, w, *torch.autograd.grad(out, leaves, grad.to(device, x))])
    for got, expected in zip(*results):
        assert got.dtype == dtype
        tol = tolerance(dtype)
        if half:
            tol["atol"] *= max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got.to(expected.dtype), expected, **tol)


# The paths of the Triton kernels (busseg_ops/triton/adjacent_relation_propagation.py), small
# enough for the interpreter: B, C, K, H, W, kernel_size, dilation, padding, dtype, gradients.
TRITON_PATHS = [
    pytest.param(2, 16, 2, 9, 11, 3, 1, "zeros", torch.float32, "both", id="full-chunks-partial-tile"),
    pytest.param(1, 13, 3, 7, 5, 3, 1, "valid", torch.float64, "both", id="partial-chunk-odd-width"),
    pytest.param(2, 5, 6, 6, 7, 3, 2, "zeros", torch.float64, "value", id="dilation-2-two-value-blocks"),
    pytest.param(1, 8, 2, 6, 7, 3, 2, "valid", torch.float32, "feat", id="dilation-2-full-chunks"),
    pytest.param(1, 4, 2, 2, 3, 5, 2, "valid", torch.float64, "both", id="map-smaller-than-the-reach"),
    pytest.param(1, 3, 5, 3, 1, 3, 1, "zeros", torch.float64, "both", id="one-column"),
    pytest.param(1, 6, 2, 5, 6, 7, 1, "zeros", torch.float64, "both", id="7x7-tap-loop"),
    pytest.param(1, 8, 2, 4, 5, 9, 1, "valid", torch.float32, "both", id="9x9-tap-loop-full-chunks"),
    pytest.param(1, 3, 2, 40, 9, 3, 30, "zeros", torch.float64, "both", id="reach-beyond-a-tile-of-rows"),
    pytest.param(1, 5, 2, 3, 140, 3, 1, "zeros", torch.float32, "both", id="wide-map-blocks"),
    pytest.param(1, 16, 2, 9, 131, 3, 40, "valid", torch.float32, "both", id="wide-map-dilation-past-a-block"),
    pytest.param(1, 13, 5, 7, 9, 3, 2, "valid", torch.float16, "both", id="float16"),
    pytest.param(
        2,
        16,
        2,
        9,
        11,
        3,
        1,
        "valid",
        torch.bfloat16,
        "both",
        id="bfloat16",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="the Triton interpreter has no bfloat16 (numpy)"
        ),
    ),
]


@pytest.mark.parametrize("B,C,K,H,W,kernel_size,dilation,padding,dtype,gradients", TRITON_PATHS)
def test_triton_paths(B, C, K, H, W, kernel_size, dilation, padding, dtype, gradients):
    """Full and partial channel chunks, value blocks, unrolled and run-time tap loops, maps smaller
    than the reach, reaches past a tile, whole-row tiles and 8 x 32 blocks of wide maps, the
    gradient of one input only, float16 and (on a GPU) bfloat16."""
    compare_triton(B, C, K, H, W, kernel_size, dilation, padding, dtype, gradients)


@pytest.mark.parametrize("programs,kernel_size", [(None, 3), (1, 5)])
def test_triton_channel_groups(monkeypatch, programs, kernel_size):
    """40 channels in float64 are 10 chunks of 4. On a small map the launcher splits them into
    groups of several chunks, fewer than a power of two (the softmax kernel masks the rest of its
    block of groups); with a target of one program, one group loops over all 10 (here with the
    run-time tap loop)."""
    triton_device()  # skips without Triton
    from busseg_ops.triton import adjacent_relation_propagation as kernels

    if programs is not None:
        monkeypatch.setattr(kernels, "_PROGRAMS", programs)
    block_c = kernels._block_c(kernels._BLOCK_C, 40, torch.float64, 1)
    _, per_group, (_, groups, _) = kernels._feature_grid(1, 40, 5, 6, block_c)
    if programs is None:
        assert per_group > block_c and groups > 1 and groups & (groups - 1)  # not a power of two
    else:
        assert groups == 1 and per_group >= 40
    compare_triton(1, 40, 2, 5, 6, kernel_size, 1, "zeros")


@pytest.mark.parametrize("shape", [(1, 0, 2, 3, 3), (1, 3, 0, 3, 3), (0, 3, 2, 3, 3), (1, 3, 2, 0, 3), (1, 3, 2, 3, 0)])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_raw_ops_on_empty_sizes(shape, backend):
    """No channels (all affinities 0: uniform weights), no value channels, no images, no pixels:
    the raw ops of every backend against the reference, forward and backward (the CPU kernel once
    divided by a zero width)."""
    device = triton_device() if backend == "triton" else devices()[-1]
    ops = torch.ops.busseg_triton if backend == "triton" else torch.ops.busseg
    B, C, K, H, W = shape
    feat = torch.randn(B, C, H, W, dtype=torch.float64, device=device)
    value = torch.randn(B, K, H, W, dtype=torch.float64, device=device)
    out, weights = ops.adjacent_relation_propagation(feat, value, 3, 1, 0.5, False)
    f, v = feat.clone().requires_grad_(), value.clone().requires_grad_()
    ref_out, ref_weights = OP.reference(f, v, 3, 1, 0.5, False)
    torch.testing.assert_close(out, ref_out.detach())
    torch.testing.assert_close(weights, ref_weights.detach())
    grad = torch.randn_like(out)
    got = ops.adjacent_relation_propagation_backward(grad, feat, value, weights, 3, 1, 0.5, False, True, True)
    expected = torch.autograd.grad(ref_out, (f, v), grad, allow_unused=True)
    for g, e, leaf in zip(got, expected, (f, v)):
        torch.testing.assert_close(g, torch.zeros_like(leaf) if e is None else e)


def test_triton_backward_takes_any_layout():
    """Channels-last features and a broadcast (stride-0) output gradient, as autograd hands them
    over, give the gradients of contiguous ones."""
    device = triton_device()
    feat = torch.randn(2, 6, 7, 9, dtype=torch.float64, device=device)
    value = torch.randn(2, 2, 7, 9, dtype=torch.float64, device=device)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        f = feat.to(memory_format=layout).requires_grad_()
        v = value.to(memory_format=layout).requires_grad_()
        out = run("triton", f, v, kernel_size=3, dilation=1)[0]
        grads.append(torch.autograd.grad(out.sum(), (f, v)))  # sum: an expanded gradient
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    feat = torch.randn(2, 16, 9, 11, device="cuda", requires_grad=True)
    value = torch.randn(2, 2, 9, 11, device="cuda")
    with busseg_ops.use_backend("reference"):
        ref = arp(feat, value)
        (g_ref,) = torch.autograd.grad(ref.sum(), feat)
    with busseg_ops.use_backend("cuda"):
        f16 = feat.detach().to(dtype).requires_grad_()
        out = arp(f16, value.to(dtype))
        (g,) = torch.autograd.grad(out.float().sum(), f16)
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype))
    torch.testing.assert_close(g.float(), g_ref, **tolerance(dtype))


def test_cpp_checks_hold_the_contract_limits():
    """csrc/adjacent_relation_propagation/checks.h and csrc/common/checks.h guard direct calls with
    the Python contract's limits: just past each, the C++ error names the argument (and the kernel
    size limit, which must be MAX_KERNEL_SIZE); at the reach limit the C++ op runs. The contract
    itself takes the same values (a MAX_KERNEL_SIZE-wide kernel is too large to run here)."""
    feat, value = torch.randn(1, 2, 3, 3), torch.randn(1, 1, 3, 3)
    past = MAX_KERNEL_SIZE + 2
    with pytest.raises(ValueError, match=rf"kernel_size must be odd and in \[1, {MAX_KERNEL_SIZE}\], got {past}$"):
        _ops.adjacent_relation_propagation(feat, value, past, 1, 1.0, False)
    # every neighbour outside: 8 zero affinities beside the centre's |f|²
    out, _ = _ops.adjacent_relation_propagation(feat, value, 3, MAX_EXTENT, 1.0, False)
    centre = feat.square().sum(1, keepdim=True).exp()
    torch.testing.assert_close(out, value * centre / (centre + 8))
    with pytest.raises(ValueError, match=r"dilation \* \(kernel_size // 2\) must be <= 2\^30, got dilation"):
        _ops.adjacent_relation_propagation(feat, value, 3, MAX_EXTENT + 1, 1.0, False)
    check_args(feat, value, MAX_KERNEL_SIZE, 1)
    check_args(feat, value, 3, MAX_EXTENT)
    with pytest.raises(ValueError, match=f"kernel_size must be <= {MAX_KERNEL_SIZE}, got {past}"):
        check_args(feat, value, past, 1)
    with pytest.raises(ValueError, match=rf"dilation \* \(kernel_size // 2\) .* must be <= {MAX_EXTENT}, got"):
        check_args(feat, value, 3, MAX_EXTENT + 1)
