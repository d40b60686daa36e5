"""ARP (RA-BUSSeg) at the upstream setting: B=8, C=256, 65×65 features (stride 8 of a
520 px crop), K=2 classes, 3×3 kernel. Ours (`cpu`; on the GPU `cuda` and `triton`, in float32 and
bfloat16) against (a) the unfold formulation of the RA-BUSSeg code and (b) torch.compile of it;
forward, and forward+backward with a given output gradient; peak memory."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ELEMENTWISE, OUR_BACKENDS, cpu_only, impl_params, nbytes, precision
from support.memory import peak_extra_mib

import busseg_ops

B, C, K, H, W, KS = 8, 256, 2, 65, 65, 3


def unfold_arp(feat, value, kernel_size=KS, dilation=1):
    """RA-BUSSeg's formulation: unfold features and values, einsum affinities, softmax, sum."""
    b, c, h, w = feat.shape
    pad = dilation * (kernel_size // 2)
    fu = F.unfold(feat, kernel_size, dilation=dilation, padding=pad).view(b, c, -1, h * w)
    vu = F.unfold(value, kernel_size, dilation=dilation, padding=pad).view(b, value.shape[1], -1, h * w)
    weights = (torch.einsum("bcp,bckp->bkp", feat.flatten(2), fu) * c**-0.5).softmax(1)
    return torch.einsum("bkp,bvkp->bvp", weights, vu).view_as(value)


def ours(backend):
    def arp(feat, value):
        with busseg_ops.use_backend(backend):
            return busseg_ops.adjacent_relation_propagation(feat, value, KS)

    return arp


_compiled = torch.compile(unfold_arp)
IMPLS = {**{b: ours(b) for b in OUR_BACKENDS}, "unfold": unfold_arp, "compiled_unfold": _compiled}


def inputs(requires_grad, dtype=torch.float32):
    """Features, values and an output gradient (fresh random numbers, in ``dtype``)."""
    g = torch.Generator().manual_seed(0)
    feat, value, grad = (torch.randn(B, c, H, W, generator=g) for c in (C, K, K))
    feat, value, grad = (t.to(DEVICE, dtype) for t in (feat, value, grad))
    return feat.requires_grad_(requires_grad), value, grad


@pytest.mark.parametrize("prec", ELEMENTWISE)
@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_arp_forward(measure, impl, prec):
    with precision(prec) as dtype, torch.no_grad():
        feat, value, _ = inputs(False, dtype)
        fn = IMPLS[impl]
        # read feat and value, write the output
        measure("arp forward", lambda: fn(feat, value), traffic=nbytes(feat, value, value))


@pytest.mark.parametrize("prec", ELEMENTWISE)
@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_arp_forward_backward(measure, impl, prec):
    with precision(prec) as dtype:
        feat, value, grad = inputs(True, dtype)
        fn = IMPLS[impl]

        def step():
            fn(feat, value).backward(grad)
            feat.grad = None

        # read feat and value, write the output; read both again with the output's gradient, write feat's
        measure("arp fwd+bwd", step, traffic=2 * nbytes(feat, value, value) + nbytes(feat))


_SETUP = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, bench_arp
feat = torch.randn(bench_arp.B, bench_arp.C, bench_arp.H, bench_arp.W, requires_grad=True)
value = torch.randn(bench_arp.B, bench_arp.K, bench_arp.H, bench_arp.W)
fn = bench_arp.IMPLS[{impl!r}]
"""


@cpu_only
@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_arp_peak_memory(impl, record_memory):
    mib = peak_extra_mib(_SETUP.format(impl=impl), "fn(feat, value).sum().backward()", warm=True)
    record_memory("arp fwd+bwd", impl, mib)
