"""ARP (RA-BUSSeg) at the upstream setting: B=8, C=256, 65×65 features (stride 8 of a
520 px crop), K=2 classes, 3×3 kernel. Ours (`cpu`; on the GPU `cuda` and `triton`) against (a)
the unfold formulation of the RA-BUSSeg code and (b) torch.compile of it; forward and
forward+backward; peak memory."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, OUR_BACKENDS, ROUNDS, cpu_only, nbytes, on_device, record_gpu

import busseg_ops
from busseg_ops.testing import peak_extra_mib

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


def inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(B, C, H, W, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return feat, torch.randn(B, K, H, W, generator=g).to(DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_arp_forward(benchmark, impl):
    benchmark.group = "arp forward"
    feat, value = inputs(False)
    fn = on_device(IMPLS[impl])
    with torch.no_grad():
        out = fn(feat, value)  # warm-up (compiles)
        benchmark.pedantic(fn, (feat, value), rounds=ROUNDS, warmup_rounds=1)
        record_gpu(benchmark, lambda: fn(feat, value), traffic=nbytes(feat, value, out))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_arp_forward_backward(benchmark, impl):
    benchmark.group = "arp fwd+bwd"
    feat, value = inputs(True)
    fn = IMPLS[impl]

    @on_device
    def step():
        fn(feat, value).sum().backward()
        feat.grad = None

    step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    # read feat and value, write the output; read both again with the output's gradient, write feat's
    record_gpu(benchmark, step, traffic=2 * nbytes(feat, value, value) + nbytes(feat))


_SETUP = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, bench_arp
feat = torch.randn(bench_arp.B, bench_arp.C, bench_arp.H, bench_arp.W, requires_grad=True)
value = torch.randn(bench_arp.B, bench_arp.K, bench_arp.H, bench_arp.W)
fn = bench_arp.IMPLS[{impl!r}]
"""


@cpu_only
@pytest.mark.parametrize("impl", list(IMPLS))
def test_arp_peak_memory(impl, record_memory):
    mib = peak_extra_mib(_SETUP.format(impl=impl), "fn(feat, value).sum().backward()", warm=True)
    record_memory("arp fwd+bwd", impl, mib)
