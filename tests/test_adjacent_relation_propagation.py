"""Adjacent relation propagation (SPEC §1): every backend against the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import backends, devices, tolerance

import busseg_ops
from busseg_ops import adjacent_relation_propagation as arp

SHAPES = [  # B, C, K, H, W
    (2, 8, 2, 9, 9),
    (1, 5, 2, 7, 12),  # B=1, C not a multiple of 4, H != W
    (3, 3, 3, 6, 5),  # odd W, K=3
    (2, 17, 1, 11, 4),
]


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


@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (3, 1), (3, 2), (5, 3), (7, 1)])
def test_reference_matches_unfold_formulation(kernel_size, dilation):
    feat, value = torch.randn(2, 6, 9, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64)
    with busseg_ops.use_backend("reference"):
        out, w = arp(feat, value, kernel_size, dilation, return_weights=True)
    ref_out, ref_w = unfold_arp(feat, value, kernel_size, dilation, 6**-0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def triton_subset(shape, kernel_size, padding):
    return (SHAPES.index(shape) + kernel_size + (padding == "valid")) % 3 == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (3, 1), (3, 3), (5, 2), (7, 1)])
@pytest.mark.parametrize("padding", ["zeros", "valid"])
@pytest.mark.parametrize("value_grad", [True, False])
def test_backends_match_reference(device, shape, kernel_size, dilation, padding, value_grad):
    B, C, K, H, W = shape
    dtype = torch.float32
    feat = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=True)
    value = torch.randn(B, K, H, W, device=device, dtype=dtype, requires_grad=value_grad)
    grad = torch.randn(B, K, H, W, device=device, dtype=dtype)
    kw = dict(kernel_size=kernel_size, dilation=dilation, padding=padding)
    ref_out, ref_w = run("reference", feat, value, **kw)
    inputs = (feat, value) if value_grad else (feat,)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad)
    for backend in backends(device):
        if backend == "triton" and device == "cpu" and not triton_subset(shape, kernel_size, padding):
            continue  # the interpreter is slow: a spread of cases, not the whole grid
        out, w = run(backend, feat, value, **kw)
        grads = torch.autograd.grad(out, inputs, grad)
        tol = tolerance(dtype)
        torch.testing.assert_close(out, ref_out, **tol, msg=f"{backend} out")
        torch.testing.assert_close(w, ref_w, **tol, msg=f"{backend} weights")
        for name, g, r in zip(("feat", "value"), grads, ref_grads):
            torch.testing.assert_close(g, r, **tol, msg=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("padding", ["zeros", "valid"])
def test_gradcheck_float64(backend, padding):
    feat = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    with busseg_ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda f, v: arp(f, v, 3, 2, padding=padding), (feat, value))


def test_only_feat_gradient_when_value_is_detached():
    feat = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: arp(f, value, 5), (feat,))


@pytest.mark.parametrize("backend", backends("cpu"))
def test_layouts_give_the_same_result(backend):
    feat = torch.randn(2, 6, 7, 9)
    value = torch.randn(2, 2, 7, 9)
    with busseg_ops.use_backend(backend):
        expected = arp(feat, value)
        assert torch.equal(arp(feat.to(memory_format=torch.channels_last), value), expected)
        assert torch.equal(arp(feat, value.to(memory_format=torch.channels_last)), expected)
        wide = torch.randn(2, 12, 7, 18)
        wide[:, ::2, :, ::2] = feat
        strided = wide[:, ::2, :, ::2]
        assert not strided.is_contiguous()
        torch.testing.assert_close(arp(strided, value), expected)


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


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_nan_propagates(backend):
    feat, value = torch.randn(1, 3, 5, 5), torch.randn(1, 2, 5, 5)
    feat[0, 0, 2, 2] = float("nan")
    with busseg_ops.use_backend(backend):
        out = arp(feat, value)
    assert out[0, :, 2, 2].isnan().all() and not out[0, :, 0, 0].isnan().any()


def test_opcheck():
    feat = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    fwd_args = (feat, value, 3, 2, 0.4, False)
    torch.library.opcheck(torch.ops.busseg.arp_forward, fwd_args)
    torch.library.opcheck(torch.ops.busseg.arp_forward, (feat, value, 5, 1, 0.4, True))
    _, w = torch.ops.busseg.arp_forward(*fwd_args)
    grad = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.busseg.arp_backward, (grad, feat.detach(), value.detach(), w, 3, 2, 0.4, False, True, True)
    )
    torch.library.opcheck(
        torch.ops.busseg.arp_backward, (grad, feat.detach(), value.detach(), w, 3, 2, 0.4, False, True, False)
    )
    if "triton" in busseg_ops.available_backends("cpu"):
        # Fake-tensor tracing of a triton_op needs a GPU; the interpreter runs the kernel instead.
        torch.library.opcheck(
            torch.ops.busseg.arp_forward_triton, fwd_args, test_utils=("test_schema", "test_autograd_registration")
        )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    feat = torch.randn(2, 6, 9, 7, requires_grad=True)
    value = torch.randn(2, 2, 9, 7, requires_grad=True)
    with busseg_ops.use_backend(backend):
        expected = arp(feat, value, 3, 2)
        g_expected = torch.autograd.grad(expected.square().sum(), (feat, value))
        compiled = torch.compile(lambda f, v: arp(f, v, 3, 2).square().sum(), fullgraph=True)
        loss = compiled(feat, value)
        grads = torch.autograd.grad(loss, (feat, value))
    torch.testing.assert_close(loss, expected.square().sum())
    for g, e in zip(grads, g_expected):
        torch.testing.assert_close(g, e)


def test_environment_variable_selects_backend(monkeypatch):
    feat, value = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)
    monkeypatch.setenv("BUSSEG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' is not available for cpu"):
        arp(feat, value)
    monkeypatch.setenv("BUSSEG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown busseg backend 'nonsense'"):
        arp(feat, value)
    with busseg_ops.use_backend("reference"):  # the context manager wins over the variable
        arp(feat, value)
    with pytest.raises(ValueError, match="unknown busseg backend"):
        busseg_ops.use_backend("fastest").__enter__()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda f, v: arp(f[0], v), ValueError, "feat must have 4 dims"),
        (lambda f, v: arp(f, v[:, :, :3]), ValueError, "feat and value must share sizes"),
        (lambda f, v: arp(f, v[:1]), ValueError, "feat and value must share sizes"),
        (lambda f, v: arp(f.long(), v), TypeError, "feat must be one of float32, float64"),
        (lambda f, v: arp(f, v.double()), TypeError, "feat and value must have the same dtype"),
        (lambda f, v: arp(f, v, kernel_size=4), ValueError, "kernel_size must be odd"),
        (lambda f, v: arp(f, v, kernel_size=0), ValueError, "kernel_size must be >= 1"),
        (lambda f, v: arp(f, v, kernel_size=3.0), TypeError, "kernel_size must be an int"),
        (lambda f, v: arp(f, v, dilation=0), ValueError, "dilation must be >= 1"),
        (lambda f, v: arp(f, v, padding="reflect"), ValueError, "padding must be one of"),
        (lambda f, v: arp(f[:, :0], v), ValueError, "feat is empty"),
        (lambda f, v: arp(f.numpy(), v), TypeError, "feat must be a torch.Tensor"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5))


def test_direct_op_call_is_checked_in_cpp():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        torch.ops.busseg.arp_forward(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), 2, 1, 1.0, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_opcheck_and_compile():
    feat = torch.randn(2, 5, 6, 7, device="cuda", dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 2, 6, 7, device="cuda", dtype=torch.float64, requires_grad=True)
    for op in (torch.ops.busseg.arp_forward, torch.ops.busseg.arp_forward_triton):
        torch.library.opcheck(op, (feat, value, 3, 2, 0.4, False))
    for backend in ("cuda", "triton"):
        with busseg_ops.use_backend(backend):
            compiled = torch.compile(lambda f, v: arp(f, v, 3, 2).square().sum(), fullgraph=True)
            torch.testing.assert_close(compiled(feat, value), arp(feat, value, 3, 2).square().sum())


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
