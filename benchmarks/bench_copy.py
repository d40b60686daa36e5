"""The machine's copy bandwidth, the yardstick of the memory-bound ops: one copy of a 1 GiB
tensor (256 MiB on the CPU) into another, counting the bytes read and written. With
``BUSSEG_BENCH_DEVICE=cuda`` a device-to-device copy; tools/gpu_check.py relates each op's
minimal traffic per second to it."""

import torch
from conftest import DEVICE, ROUNDS, on_device

MIB = 1024 if DEVICE == "cuda" else 256


def test_copy(benchmark):
    benchmark.group = "copy"
    src = torch.ones(MIB * 2**20 // 4, device=DEVICE)
    dst = torch.empty_like(src)
    benchmark.extra_info["bytes"] = 2 * MIB * 2**20
    benchmark.pedantic(on_device(dst.copy_), (src,), rounds=ROUNDS, warmup_rounds=2)
