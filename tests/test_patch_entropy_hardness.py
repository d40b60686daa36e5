"""patch_entropy_hardness (PH-Net Eq. 4): the op contract, the reference against the pooled
entropy, num_patches against patch_size, and the CPU's two-class logits path."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance, triton_device
from hypothesis import strategies as st
from op_contract import OpContract, RawSample, bad

import busseg_ops
from busseg_ops import patch_entropy_hardness as hardness
from busseg_ops.ops.patch_entropy_hardness import OP

_ops = torch.ops.busseg

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


def _raw(x=None, patch=(2, 2)):
    x = torch.rand(1, 2, 8, 8) if x is None else x
    return lambda: _ops.patch_entropy_hardness(x, *patch, False, 1e-10)


def _raw_backward(grad=None, x=None):
    x = torch.rand(1, 2, 8, 8) if x is None else x
    grad = torch.rand(1, 4, 4) if grad is None else grad
    return lambda: _ops.patch_entropy_hardness_backward(grad, x, 2, 2, False, 1e-10)


class TestPatchEntropyHardness(OpContract):
    op = OP
    cases = [(shape, from_logits) for shape in SHAPES for from_logits in (False, True)] + [
        (SHAPES[1], True, torch.float64)
    ]
    gradcheck_cases = [False, True]

    def make_inputs(self, case, device):
        (B, K, H, W, patch), from_logits, *dtype = case
        logits = torch.randn(B, K, H, W, device=device, dtype=(dtype or [torch.float32])[0]) * 3
        x = (logits if from_logits else logits.softmax(1)).requires_grad_()
        return x, patch, from_logits

    def call(self, x, patch, from_logits):
        return hardness(x, patch_size=patch, from_logits=from_logits)

    def check_reference(self, case, inputs, expected):
        x, patch, from_logits = inputs
        p = x.detach().softmax(1) if from_logits else x.detach()
        torch.testing.assert_close(expected, pooled_entropy(p, patch), **tolerance(x.dtype))

    def runs_case(self, backend, device, case):
        # the Triton kernels accumulate in float32 whatever the input dtype
        return backend != "triton" or len(case) == 2

    def grad_tolerance(self, dtype, expected):
        return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tolerance(dtype)

    def property_case(self):
        return st.tuples(
            st.integers(1, 3),
            st.integers(2, 5),
            st.integers(1, 4),
            st.integers(1, 4),
            st.integers(1, 4),
            st.integers(1, 4),
            st.booleans(),
            st.sampled_from([torch.float32, torch.float64]),
        ).map(lambda c: ((c[0], c[1], c[2] * c[4], c[3] * c[5], (c[4], c[5])), c[6], c[7]))

    def gradcheck_inputs(self, from_logits, backend):
        x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
        x = (x if from_logits else x.softmax(1)).requires_grad_()
        return (lambda t: hardness(t, patch_size=(2, 3), from_logits=from_logits)), (x,)

    def compile_inputs(self):
        x = torch.randn(2, 2, 8, 8, requires_grad=True)
        return (lambda t: hardness(t, num_patches=4, from_logits=True).square().sum()), (x,)

    def nan_inputs(self):
        x = torch.rand(1, 2, 4, 4)
        x[0, 0, 0, 0] = float("nan")
        return x, (2, 2), False

    def check_nan(self, out, inputs):
        assert out[0, 0, 0].isnan() and not out[0, 1, 1].isnan()

    def layout_inputs(self):
        return torch.randn(2, 2, 12, 16).softmax(1), (3, 4), False

    def bad_input_args(self):
        return (torch.rand(2, 2, 8, 8),)

    bad_inputs = [
        bad(lambda x: hardness(x, patch_size=(3, 4)), ValueError, r"patch_size 3×4 does not divide the map size 8×8"),
        bad(lambda x: hardness(x, num_patches=3), ValueError, r"num_patches 3×3 does not divide the map size 8×8"),
        bad(lambda x: hardness(x), ValueError, "exactly one of num_patches and patch_size"),
        bad(lambda x: hardness(x, num_patches=2, patch_size=4), ValueError, "exactly one"),
        bad(lambda x: hardness(x[:, :1], num_patches=2), ValueError, "K >= 2"),
        bad(lambda x: hardness(x[0], num_patches=2), ValueError, "x must have 4 dims"),
        bad(lambda x: hardness(x.long(), num_patches=2), TypeError, "x must be one of float32"),
        bad(lambda x: hardness(x, num_patches=0), ValueError, "num_patches must be >= 1"),
        bad(lambda x: hardness(x[:, :, :0], num_patches=2), ValueError, "x is empty"),
        bad(lambda x: hardness(x, num_patches=2**64), ValueError, "num_patches must be <= "),
        bad(lambda x: hardness(x, patch_size=(2**63, 1)), ValueError, "patch_size must be <= "),
        # scalars (issue 29): eps -1 or NaN gave NaN, and so does eps = 0 where a probability is 0
        bad(lambda x: hardness(x, 2, eps=-1.0), ValueError, "eps must be a finite float > 0, got -1.0"),
        bad(lambda x: hardness(x, 2, eps=0.0), ValueError, "eps must be a finite float > 0, got 0.0"),
        bad(lambda x: hardness(x, 2, eps=float("nan")), ValueError, "eps must be a finite float > 0, got nan"),
        bad(lambda x: hardness(x, 2, eps=float("inf")), ValueError, "eps must be a finite float > 0, got inf"),
        bad(lambda x: hardness(x, 2, eps=True), TypeError, "eps must be a float, got bool"),
        bad(lambda x: hardness(x, True), TypeError, "num_patches must be an int or a pair of ints, got True"),
    ]

    raw_bad_inputs = [
        bad(_raw(patch=(3, 3)), ValueError, r"patch size \(3, 3\) must divide the map size \(8, 8\)"),
        bad(_raw(patch=(0, 2)), ValueError, "must divide the map size"),
        bad(_raw(patch=(2**63 - 1, 2)), ValueError, "must divide the map size"),
        bad(_raw(x=torch.rand(1, 1, 8, 8)), ValueError, "K >= 2"),
        bad(_raw(x=torch.ones(1, 2, 8, 8, dtype=torch.int64)), TypeError, "x must be float32"),
        bad(_raw_backward(grad=torch.rand(1, 4, 3)), ValueError, r"grad must be \(B, Nh, Nw\)"),
        bad(_raw_backward(grad=torch.rand(4, 4)), ValueError, r"grad must be \(B, Nh, Nw\)"),
        bad(_raw_backward(grad=torch.ones(1, 4, 4, dtype=torch.int32)), TypeError, "grad must be float32"),
        bad(_raw_backward(grad=torch.rand(1, 4, 4, device="meta")), ValueError, "device"),
    ]

    def raw_samples(self):
        x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
        probs = x.detach().softmax(1).requires_grad_()
        grad = torch.randn(2, 2, 4, dtype=torch.float64)
        free = {(0, "dim", 0), (0, "dim", 1)}
        return [
            RawSample(OP.name, (probs, 3, 2, False, 1e-10), free=free),
            RawSample(OP.name, (x, 3, 2, True, 1e-10), free=free),
            RawSample(f"{OP.name}_backward", (grad, x.detach(), 3, 2, True, 1e-10), free={(1, "dim", 1)}),
        ]

    def triton_opcheck_samples(self):
        x = torch.randn(2, 3, 6, 8, requires_grad=True)
        return [RawSample(OP.name, (x, 3, 2, True, 1e-10))]


@pytest.mark.parametrize("from_logits", [False, True])
def test_reference_hardness_matches_avg_pool_of_entropy(from_logits):
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    p = x.softmax(1)
    with busseg_ops.use_backend("reference"):
        r = hardness(x if from_logits else p, patch_size=(4, 2), from_logits=from_logits)
    torch.testing.assert_close(r, pooled_entropy(p, (4, 2)))
    assert r.min() >= 0 and r.max() <= 1


@pytest.mark.parametrize("from_logits", [False, True])
def test_triton_patches_larger_than_a_block(from_logits):
    """Patches of 24 x 24 = 576 pixels: more than one Triton tile (16 x 32: at most 512 pixels; tiles
    of 1024 spilled registers on sm_90), so both kernels loop over the patch."""
    device = triton_device()
    logits = torch.randn(1, 3, 24, 48, device=device) * 3
    x = (logits if from_logits else logits.softmax(1)).requires_grad_()
    grad = torch.randn(1, 1, 2, device=device)
    results = []
    for backend in ("reference", "triton"):
        with busseg_ops.use_backend(backend):
            out = hardness(x, patch_size=24, from_logits=from_logits)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_num_patches_equals_patch_size_and_layouts():
    x = torch.randn(2, 2, 12, 16).softmax(1)
    expected = hardness(x, patch_size=(3, 4))
    torch.testing.assert_close(hardness(x, num_patches=4), expected)
    torch.testing.assert_close(hardness(x.to(memory_format=torch.channels_last), num_patches=4), expected)
    torch.testing.assert_close(hardness(x.transpose(2, 3).contiguous().transpose(2, 3), num_patches=4), expected)


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


# Shapes that reach every path of the GPU kernels. CUDA: units of V pixels (one 128-bit vector of
# the dtype where the patch width, the row length and the pointers allow; else single pixels),
# 32 to 256 threads per patch (patches per block: 256 / that), loops where a patch has more units
# than threads. Triton: 2-D tiles of the patch, looping where a patch is larger than one.
GPU_SHAPES = [  # B, K, H, W, patch
    (2, 2, 64, 64, (32, 32)),  # fp32: 256 vectors, 256 threads; 16-bit: 128 vectors
    (1, 2, 128, 128, (64, 128)),  # more vectors than threads; Triton: 8 x 64 tiles, looping
    (2, 2, 16, 32, (4, 8)),  # 32 threads per patch, 8 patches per block
    (2, 3, 12, 20, (3, 5)),  # single pixels (5 is no multiple of a vector), K = 3
    (1, 2, 6, 6, (1, 1)),  # one pixel per patch
]


def _gpu_backends():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, [b for b in ("cuda", "triton") if b in busseg_ops.available_backends(device)]


def _misaligned(t):
    """t's values in a contiguous tensor whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_gpu_kernels_every_path(shape, dtype):
    device, names = _gpu_backends()
    if device == "cpu" and dtype in (torch.bfloat16, torch.float64):
        pytest.skip("the Triton interpreter: no bfloat16 (numpy), float64 as float32 (time)")
    if not names:
        pytest.skip("no GPU backend here")
    B, K, H, W, patch = shape
    for from_logits in (False, True):
        logits = torch.randn(B, K, H, W, device=device) * 3
        x32 = logits if from_logits else logits.softmax(1)
        x = x32.to(dtype)
        grad = torch.randn(B, H // patch[0], W // patch[1], device=device)
        wide = x.float().requires_grad_()  # the same rounded values
        with busseg_ops.use_backend("reference"):
            expected = hardness(wide, patch_size=patch, from_logits=from_logits)
        (expected_dx,) = torch.autograd.grad(expected, wide, grad)
        for backend in names:
            # float64 on Triton and the 16-bit types: float32 sums, checked at the float32 result
            tol = tolerance(dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32)
            for layout in (lambda t: t, _misaligned):
                xb = layout(x.detach()).requires_grad_()
                with busseg_ops.use_backend(backend):
                    out = hardness(xb, patch_size=patch, from_logits=from_logits)
                (dx,) = torch.autograd.grad(out, xb, grad.to(dtype))
                msg = f"{backend} from_logits={from_logits} aligned={layout is not _misaligned}"
                assert out.dtype == dtype and dx.dtype == dtype, msg
                torch.testing.assert_close(out.float(), expected, **tol, msg=msg)
                scale = max(1.0, expected_dx.abs().max().item())
                torch.testing.assert_close(dx.float(), expected_dx, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=msg)
