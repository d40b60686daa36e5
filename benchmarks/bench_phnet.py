"""PH-Net ops at the training settings of the paper. Ours is `cpu` (on the GPU `cuda` and `triton`;
the cutmix has no Triton kernel and runs `cuda` there).

(1) Hardness + cutmix: B=8, 2×512×512 logits, 3×512×512 images (+ pseudo-labels and
    confidences), N=16 patches per side. Ours against the PH-Net public-code formulation
    (chunk/cat into patches, a Python loop per image).
(2) Contrastive fwd+bwd at N = N⁻ = 8192, D = 256: ours against the materialising reference
    (time and peak memory), negatives detached as the default caller does.
(3) N = N⁻ = 65536, D = 256, ours: must simply run (time and peak memory recorded)."""

import math

import pytest
import torch
from conftest import DEVICE, OUR_BACKENDS, ROUNDS, cpu_only, nbytes, on_device, record_gpu

import busseg_ops
from busseg_ops.testing import peak_extra_mib

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


def ours_hardness_cutmix(backend):
    def hardness_cutmix(logits, image, label, conf, k, generator):
        with busseg_ops.use_backend(backend):
            hard = busseg_ops.patch_entropy_hardness(logits, num_patches=NP, from_logits=True)
        with busseg_ops.use_backend("cuda" if backend == "triton" else backend):
            return busseg_ops.adaptive_patch_cutmix([image, label, conf], hard, k, generator=generator)

    return hardness_cutmix


def patch_inputs():
    g = torch.Generator().manual_seed(0)
    return tuple(
        t.to(DEVICE)
        for t in (
            torch.randn(B, K, S, S, generator=g),
            torch.randn(B, C, S, S, generator=g),
            torch.randint(0, 2, (B, S, S), generator=g),
            torch.rand(B, S, S, generator=g),
        )
    )


PATCH_IMPLS = {**{b: ours_hardness_cutmix(b) for b in OUR_BACKENDS}, "upstream_chunk_loop": upstream_hardness_cutmix}


@pytest.mark.parametrize("impl", list(PATCH_IMPLS))
def test_hardness_cutmix(benchmark, impl):
    benchmark.group = "hardness+cutmix B=8 512² N=16"
    args = patch_inputs()
    # ours draw on the device from a generator there (the upstream code draws on the CPU)
    g = torch.Generator(device=DEVICE if impl in OUR_BACKENDS else "cpu").manual_seed(1)
    fn = on_device(PATCH_IMPLS[impl])
    benchmark.pedantic(lambda: fn(*args, 38, g), rounds=ROUNDS, warmup_rounds=1)
    # read the logits and the three tensors to mix, write the three mixed ones
    record_gpu(benchmark, lambda: fn(*args, 38, g), traffic=nbytes(*args) + nbytes(*args[1:]))


def contrastive_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, ya, neg, yn, pos = (
        torch.randn(n, d, generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(n, d, generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(2, d, generator=g),
    )
    return a.to(DEVICE).requires_grad_(), ya.to(DEVICE), neg.to(DEVICE), yn.to(DEVICE), pos.to(DEVICE)


def contrastive_step(backend, a, ya, neg, yn, pos):
    with busseg_ops.use_backend(backend):
        busseg_ops.memory_contrastive_loss(a, ya, neg, yn, pos, 0.5).backward()
    a.grad = None


CONTRASTIVE_IMPLS = [*OUR_BACKENDS, "reference"]


@pytest.mark.parametrize("impl", CONTRASTIVE_IMPLS)
def test_contrastive_8k(benchmark, impl):
    benchmark.group = "contrastive fwd+bwd N=N⁻=8192 D=256"
    args = contrastive_inputs(8192, 256)
    step = on_device(lambda: contrastive_step(impl, *args))
    benchmark.pedantic(step, rounds=3 if DEVICE == "cpu" else ROUNDS, warmup_rounds=1)
    record_gpu(benchmark, step)


_SETUP = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, bench_phnet
args = bench_phnet.contrastive_inputs({n}, 256)
"""


@cpu_only
@pytest.mark.parametrize("impl", CONTRASTIVE_IMPLS)
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
@pytest.mark.parametrize("impl", OUR_BACKENDS)
def test_contrastive_64k(benchmark, impl):
    benchmark.group = "contrastive fwd+bwd N=N⁻=65536 D=256"
    args = contrastive_inputs(65536, 256)
    step = on_device(lambda: contrastive_step(impl, *args))
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    record_gpu(benchmark, step)
