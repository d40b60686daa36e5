"""PH-Net ops at the paper's training settings. Ours (`cpu`; on the GPU `cuda` and `triton`, the
cutmix `cuda` only) against (1) hardness + cutmix as PH-Net's public code writes them (chunk/cat into
patches, a Python loop per image); (2) the contrastive loss against the materialising reference at
N = N⁻ = 8192 (time and peak memory; on the GPU also torch.compile of it); (3) at N = N⁻ = 65536,
where ours must simply run."""

import math

import pytest
import torch
from conftest import DEVICE, ELEMENTWISE, MATMUL, OUR_BACKENDS, cpu_only, impl_params, nbytes, precision
from support.memory import peak_extra_mib

import busseg_ops
from busseg_ops.reference.memory_contrastive_loss import memory_contrastive_loss as spec_contrastive

B, K, C, S, NP = 8, 2, 3, 512, 16


def upstream_hardness_cutmix(logits, image, label, conf, k, generator):
    """PH-Net public-code style: softmax, per-image torch.chunk into N×N patches, a Python loop
    over images and patches for the entropy, and cat-based reassembly for the mix."""
    prob = logits.softmax(1)
    n = NP
    mixed = ([], [], [])
    masks = []
    for b in range(prob.shape[0]):
        patches = [p for row in torch.chunk(prob[b], n, 1) for p in torch.chunk(row, n, 2)]
        score = torch.stack([-(p * torch.log(p + 1e-10)).sum(0).mean() / math.log(K) for p in patches])
        order = torch.argsort(score, descending=True)
        m = torch.ones(n * n, dtype=torch.bool, device=prob.device)
        rest = order[k:][torch.randperm(n * n - k, generator=generator)]
        share = int(round((0.1 + 0.4 * float(torch.rand(1, generator=generator))) * n * n))
        m[rest[: min(share, n * n - k)]] = False
        masks.append(m.view(n, n))
        nb = (b + 1) % prob.shape[0]
        for out, t in zip(mixed, (image, label, conf)):
            own = [list(torch.chunk(r, n, -1)) for r in torch.chunk(t[b], n, -2)]
            other = [list(torch.chunk(r, n, -1)) for r in torch.chunk(t[nb], n, -2)]
            rows = [torch.cat([own[i][j] if m[i * n + j] else other[i][j] for j in range(n)], -1) for i in range(n)]
            out.append(torch.cat(rows, -2))
    return [torch.stack(o) for o in mixed], torch.stack(masks)


def cutmix_generator() -> torch.Generator:
    """The generator our adaptive_patch_cutmix draws from: on the benchmark's device, so a GPU call
    draws there (a CPU generator would copy the draws over and wait for them)."""
    return torch.Generator(device=DEVICE).manual_seed(1)


def ours_hardness_cutmix(backend):
    def hardness_cutmix(logits, image, label, conf, k, generator):
        with busseg_ops.use_backend(backend):
            hard = busseg_ops.patch_entropy_hardness(logits, num_patches=NP, from_logits=True)
        with busseg_ops.use_backend("cuda" if backend == "triton" else backend):
            return busseg_ops.adaptive_patch_cutmix([image, label, conf], hard, k, generator=generator)

    return hardness_cutmix


def patch_inputs(dtype=torch.float32):
    """Logits, image, pseudo-label (int64) and confidence; the floating ones in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    logits, image, label, conf = (
        torch.randn(B, K, S, S, generator=g),
        torch.randn(B, C, S, S, generator=g),
        torch.randint(0, 2, (B, S, S), generator=g),
        torch.rand(B, S, S, generator=g),
    )
    return logits.to(DEVICE, dtype), image.to(DEVICE, dtype), label.to(DEVICE), conf.to(DEVICE, dtype)


PATCH_IMPLS = {**{b: ours_hardness_cutmix(b) for b in OUR_BACKENDS}, "upstream_chunk_loop": upstream_hardness_cutmix}


@pytest.mark.parametrize("prec", ELEMENTWISE)
@pytest.mark.parametrize("impl", impl_params(PATCH_IMPLS))
def test_hardness_cutmix(measure, impl, prec):
    with precision(prec) as dtype:
        args = patch_inputs(dtype)
        g = torch.Generator().manual_seed(1) if impl == "upstream_chunk_loop" else cutmix_generator()
        fn = PATCH_IMPLS[impl]
        # read the logits and the three tensors to mix, write the three mixed ones
        measure("hardness+cutmix B=8 512² N=16", lambda: fn(*args, 38, g), traffic=nbytes(*args) + nbytes(*args[1:]))


def contrastive_inputs(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a, ya, neg, yn, pos = (
        torch.randn(n, d, generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(n, d, generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(2, d, generator=g),
    )
    a, neg, pos = (t.to(DEVICE, dtype) for t in (a, neg, pos))
    return a.requires_grad_(), ya.to(DEVICE), neg, yn.to(DEVICE), pos


def _reference_contrastive(a, ya, neg, yn, pos):
    has_positive = torch.ones(pos.shape[0], dtype=torch.bool, device=pos.device)
    return spec_contrastive(a, ya, neg, yn, pos, has_positive, 0.5, False)[0]


_compiled_reference_contrastive = torch.compile(_reference_contrastive)


def contrastive_step(impl, a, ya, neg, yn, pos):
    """Forward and backward of one implementation: a backend of ours, the reference through the
    public op, or torch.compile of the reference formula."""
    if impl == "compiled_reference":
        _compiled_reference_contrastive(a, ya, neg, yn, pos).backward()
    else:
        with busseg_ops.use_backend(impl):
            busseg_ops.memory_contrastive_loss(a, ya, neg, yn, pos, 0.5).backward()
    a.grad = None


# torch.compile of the reference on the GPU only (on the CPU it would add minutes to `make bench`)
CONTRASTIVE_IMPLS = [*OUR_BACKENDS, "reference", *(["compiled_reference"] if DEVICE == "cuda" else [])]


@pytest.mark.parametrize("prec", MATMUL)
@pytest.mark.parametrize("impl", impl_params(CONTRASTIVE_IMPLS))
def test_contrastive_8k(measure, impl, prec):
    with precision(prec) as dtype:
        args = contrastive_inputs(8192, 256, dtype=dtype)
        measure("contrastive fwd+bwd N=N⁻=8192 D=256", lambda: contrastive_step(impl, *args), rounds=3)


_SETUP = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, bench_phnet
args = bench_phnet.contrastive_inputs({n}, 256)
"""


@cpu_only
@pytest.mark.parametrize("impl", impl_params(CONTRASTIVE_IMPLS))
def test_contrastive_8k_peak_memory(impl, record_memory):
    mib = peak_extra_mib(_SETUP.format(n=8192), f"bench_phnet.contrastive_step({impl!r}, *args)", warm=True)
    record_memory("contrastive fwd+bwd N=N⁻=8192 D=256", impl, mib)


@cpu_only
def test_contrastive_64k_runs(record_memory, tmp_path):
    """One fwd+bwd in a fresh process (too slow to repeat on 2 cores): peak memory and wall time."""
    out = tmp_path / "seconds"
    stmt = (
        f"import time; t0 = time.perf_counter(); bench_phnet.contrastive_step('cpu', *args); "
        f"open({str(out)!r}, 'w').write(str(time.perf_counter() - t0))"
    )
    mib = peak_extra_mib(_SETUP.format(n=65536), stmt)
    group = "contrastive fwd+bwd N=N⁻=65536 D=256 (cpu only, 1 run)"
    record_memory(group, "cpu", mib)
    record_memory(group, "cpu seconds (not MiB)", float(out.read_text()))


@pytest.mark.skipif(DEVICE == "cpu", reason="on the CPU one run only: test_contrastive_64k_runs")
@pytest.mark.parametrize("prec", ["tf32", "bf16"])
@pytest.mark.parametrize("impl", OUR_BACKENDS)
def test_contrastive_64k(measure, impl, prec):
    with precision(prec) as dtype:
        args = contrastive_inputs(65536, 256, dtype=dtype)
        measure("contrastive fwd+bwd N=N⁻=65536 D=256", lambda: contrastive_step(impl, *args))
