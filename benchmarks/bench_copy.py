"""The machine's copy bandwidth, the yardstick of the memory-bound ops: one copy of a 1 GiB
tensor (256 MiB on the CPU) into another, counting the bytes read and written. With
``BUSSEG_BENCH_DEVICE=cuda`` a device-to-device copy; the GPU report relates each op's least
traffic per second to it."""

import torch
from conftest import DEVICE
from speedups import COPY_GROUP

MIB = 1024 if DEVICE == "cuda" else 256


def test_copy(measure):
    src = torch.ones(MIB * 2**20 // 4, device=DEVICE)
    dst = torch.empty_like(src)
    measure(COPY_GROUP, lambda: dst.copy_(src), traffic=2 * MIB * 2**20, warmup_rounds=2)
