"""CRA (RA-BUSSeg) at the upstream setting: B=8, 65×65 deep features, M=64 proxies. Ours (`cpu`; on
the GPU `cuda`, and `triton` where the op has it) against upstream's greedy sampling (the
materialised (B, HW, HW) map, then a per-step argmin loop) and against the reference alignment loss
over four layers (einsum + softmax + KLDivLoss per adjacent pair), eager and compiled.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ELEMENTWISE, MATMUL, OUR_BACKENDS, cpu_only, impl_params, precision
from support.memory import peak_extra_mib

import busseg_ops
from busseg_ops.reference.cross_layer_alignment_loss import cross_layer_alignment_loss as spec_loss

B, C, H, W, M = 8, 256, 65, 65, 64
CHANNELS = (256, 512, 1024, 2048)


def upstream_sampling(feat, first, num_proxies=M):
    """RA-BUSSeg's formulation: the whole correlation map, then per image and per step a pass
    over it with argmin (the same selection rule as greedy_proxy_sampling)."""
    b, c, h, w = feat.shape
    f = feat.flatten(2)
    corr = torch.bmm(f.transpose(1, 2), f) * c**-0.5  # (B, HW, HW)
    out = []
    for i in range(b):
        chosen = [int(first[i])]
        cumulative = torch.zeros(h * w, device=feat.device)
        score = torch.full((h * w,), float("-inf"), device=feat.device)
        for _ in range(num_proxies - 1):
            cumulative = cumulative + corr[i, chosen[-1]]
            score = torch.maximum(score, cumulative)
            masked = score.clone()
            masked[chosen] = float("inf")
            chosen.append(int(masked.argmin()))
        out.append(chosen)
    return torch.tensor(out, device=feat.device)


def ours_sampling(backend):
    def sampling(feat, first):
        with busseg_ops.use_backend(backend):
            return busseg_ops.greedy_proxy_sampling(feat, M, first=first)

    return sampling


SAMPLING = {**{b: ours_sampling(b) for b in OUR_BACKENDS if b != "triton"}, "upstream": upstream_sampling}


def sampling_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    feat, first = torch.randn(B, C, H, W, generator=g).relu(), torch.randint(0, H * W, (B,), generator=g)
    return feat.to(DEVICE, dtype), first.to(DEVICE)


@pytest.mark.parametrize("prec", ELEMENTWISE)
@pytest.mark.parametrize("impl", impl_params(SAMPLING))
def test_cra_sampling(measure, impl, prec):
    with precision(prec) as dtype:
        feat, first = sampling_inputs(dtype)
        fn = SAMPLING[impl]
        if impl != "upstream" and dtype == torch.float32:  # in bfloat16 near-ties may fall either way
            assert torch.equal(fn(feat, first), upstream_sampling(feat, first))
        measure("cra greedy sampling", lambda: fn(feat, first))


def reference_loss(feats, proxies):
    with busseg_ops.use_backend("reference"):
        return busseg_ops.cross_layer_alignment_loss(feats, proxies)


def ours_loss(backend):
    def loss(feats, proxies):
        with busseg_ops.use_backend(backend):
            return busseg_ops.cross_layer_alignment_loss(feats, proxies)

    return loss


_compiled_reference = torch.compile(spec_loss)


def compiled_reference_loss(feats, proxies):
    return _compiled_reference(feats, proxies, "mean", 1e-10)


LOSS = {
    **{b: ours_loss(b) for b in OUR_BACKENDS},
    "reference": reference_loss,
    "compiled_reference": compiled_reference_loss,
}


def loss_inputs(dtype=torch.float32):
    """Layer maps (layer 1 at 130×130), the 65×65 grid feats (detached) and the proxies gathered
    from each map at the mapped greedy indices (leaves that require grad), in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    maps = [
        torch.randn(B, c, 2 * H if l == 0 else H, 2 * W if l == 0 else W, generator=g).to(DEVICE, dtype)
        for l, c in enumerate(CHANNELS)
    ]
    feats = [F.interpolate(maps[0], (H, W), mode="bilinear", align_corners=True)] + maps[1:]
    idx = busseg_ops.greedy_proxy_sampling(maps[-1], M, first=torch.zeros(B, dtype=torch.long, device=DEVICE))
    proxies = [busseg_ops.gather_proxies(maps[0], busseg_ops.map_proxy_indices(idx, (H, W), (2 * H, 2 * W)))]
    proxies += [busseg_ops.gather_proxies(m, idx) for m in maps[1:]]
    return feats, [p.contiguous().requires_grad_() for p in proxies]


@pytest.mark.parametrize("prec", MATMUL)
@pytest.mark.parametrize("impl", impl_params(LOSS))
def test_cra_loss_forward_backward(measure, impl, prec):
    with precision(prec) as dtype:
        feats, proxies = loss_inputs(dtype)
        fn = LOSS[impl]

        def step():
            fn(feats, proxies).backward()
            for p in proxies:
                p.grad = None

        measure("cra loss fwd+bwd", step)


_SETUP = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, bench_cra
"""


@cpu_only
@pytest.mark.parametrize("impl", impl_params(SAMPLING))
def test_cra_sampling_peak_memory(impl, record_memory):
    setup = _SETUP + f"feat, first = bench_cra.sampling_inputs()\nfn = bench_cra.SAMPLING[{impl!r}]\n"
    record_memory("cra greedy sampling", impl, peak_extra_mib(setup, "fn(feat, first)"))


@cpu_only
@pytest.mark.parametrize("impl", impl_params(LOSS))
def test_cra_loss_peak_memory(impl, record_memory):
    setup = _SETUP + f"feats, proxies = bench_cra.loss_inputs()\nfn = bench_cra.LOSS[{impl!r}]\n"
    record_memory("cra loss fwd+bwd", impl, peak_extra_mib(setup, "fn(feats, proxies).backward()", warm=True))
