"""Benchmark plumbing: each case is `benchmark(fn)` with `benchmark.group` naming the problem and
`benchmark.name`'s parameter naming the implementation; peak memory goes through the
`record_memory` fixture. At the end a Markdown table of medians, speed-ups against every
baseline of the same group by medians and by minima (all from this one run) and peak memory is
printed and appended to benchmarks/last_run.md (`make bench` clears it first and runs each file
in a process of its own, so one benchmark's leftovers — compiled graphs, allocator state — cannot
slow another's).

``BUSSEG_BENCH_DEVICE=cuda`` runs the op benchmarks on the GPU (`make gpu-check`, through
tools/gpu_check.py): our `cuda` and `triton` backends then take the place of `cpu`, each timed
call waits for the device (`on_device`), and each records in ``benchmark.extra_info`` its
minimal memory traffic (``bytes``, for the bandwidth against a measured device copy) and the
GPU memory it adds at its peak (``peak_mib``)."""

import os
import sys
from collections import defaultdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from speedups import speedups  # noqa: E402 (benchmarks/ on the path first)

_memory: dict[str, dict[str, float]] = defaultdict(dict)

DEVICE = os.environ.get("BUSSEG_BENCH_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"BUSSEG_BENCH_DEVICE must be cpu or cuda, got {DEVICE!r}")
#: our backends under test on DEVICE
OUR_BACKENDS = ("cpu",) if DEVICE == "cpu" else ("cuda", "triton")
#: timed rounds: a GPU round is short and its time noisier
ROUNDS = 5 if DEVICE == "cpu" else 20


#: GiB of memory a CPU benchmark process touches and frees before its first timing
PRETOUCH_GIB = 4


def pytest_sessionstart(session):
    """On the CPU, touch PRETOUCH_GIB of memory once and free it before any timing. This VM's host
    backs guest memory on first touch (about 1 GB/s), and until a process has cycled through
    enough of it, fresh allocations land at random on slow pages: the same ARP backward took 45 ms
    or 7 ms with identical page-fault counts, its first dozen calls slow. Afterwards every
    implementation allocates from memory the host already backs, as on a physical machine."""
    if DEVICE == "cpu":
        torch.ones(PRETOUCH_GIB << 28)  # float32: 2^28 per GiB


#: the peak-memory probes of a fresh CPU process (on the GPU the timing tests record it)
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="peak memory on the GPU: extra_info of the timing tests")


def on_device(fn):
    """``fn`` that returns once the device has finished its work (a GPU call returns at launch)."""
    if DEVICE == "cpu":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def nbytes(*tensors) -> int:
    """Bytes of the tensors (lists of tensors too): each read or written once is the least traffic."""
    return sum(nbytes(*t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size() for t in tensors)


def record_gpu(benchmark, fn, traffic: int | None = None) -> None:
    """On the GPU, ``benchmark.extra_info``: the minimal traffic in bytes (where the op is bound by
    memory) and the CUDA memory one more call of ``fn`` adds at its peak."""
    if DEVICE == "cpu":
        return
    if traffic is not None:
        benchmark.extra_info["bytes"] = traffic
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.fixture
def record_memory():
    def record(group: str, impl: str, mib: float) -> None:
        _memory[group][impl] = mib

    return record


def summary_table(medians: dict, minima: dict, memory: dict) -> list[str]:
    """Markdown rows: per group and implementation the median, the speed-ups against every baseline
    of the group by medians and by minima (all from this one run), and the peak extra memory. On a
    shared VM rounds can fall in a slow mode (benchmarks/RESULTS.md): where the two ratios part,
    the rounds did."""
    lines = [
        "| group | implementation | median (ms) | speed-up vs baselines | by minima | peak extra MiB |",
        "|---|---|---|---|---|---|",
    ]
    for group in sorted(set(medians) | set(memory)):
        times = medians.get(group, {})
        for impl in dict.fromkeys(list(times) + list(memory.get(group, {}))):
            t = times.get(impl)
            mem = memory.get(group, {}).get(impl)
            lines.append(
                f"| {group} | {impl} | {'' if t is None else f'{t * 1e3:.2f}'} | {speedups(times, impl)} "
                f"| {speedups(minima.get(group, {}), impl)} | {'' if mem is None else f'{mem:.0f}'} |"
            )
    return lines


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    minima: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in getattr(session, "benchmarks", []) or []:
        impl = bench.name.split("[", 1)[1].rstrip("]") if "[" in bench.name else bench.name
        medians[bench.group][impl] = bench.stats.median
        minima[bench.group][impl] = bench.stats.min
    if not medians and not _memory:
        return
    table = "\n".join(summary_table(medians, minima, _memory))
    terminalreporter.write_line("\n" + table)
    with open(os.path.join(os.path.dirname(__file__), "last_run.md"), "a") as f:
        f.write(table + "\n\n")
