"""Benchmark plumbing. Every timed case calls the ``measure`` fixture once,
``measure(group, fn, traffic=None)``: ``group`` names the problem, the test's ``impl`` parameter the
implementation (and its ``prec`` the precision, where it has one). On the CPU pytest-benchmark
times it, and a table of medians, speed-ups against the same run's baselines and peak memory goes to
benchmarks/last_run.md. With ``BUSSEG_BENCH_DEVICE=cuda`` CUDA events time it, the L2 flushed, and
each case is written at once as a JSON line to ``BUSSEG_BENCH_JSONL``, so a run stopped by a time
limit keeps what it measured. How and why: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# tests/support (the papers' code restated and loaded, the memory probe), after benchmarks/ so that
# `conftest` stays this file
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from speedups import gpu_table, is_baseline, speedups  # noqa: E402 (benchmarks/ on the path first)

_memory: dict[str, dict[str, float]] = defaultdict(dict)
_gpu_rows: list[dict] = []

DEVICE = os.environ.get("BUSSEG_BENCH_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"BUSSEG_BENCH_DEVICE must be cpu or cuda, got {DEVICE!r}")
#: our backends under test on DEVICE
OUR_BACKENDS = ("cpu",) if DEVICE == "cpu" else ("cuda", "triton")
#: pytest-benchmark's timed rounds on the CPU
ROUNDS = 5

#: precision name -> (input dtype, torch.set_float32_matmul_precision value). "fp32" is exact
#: float32 (no TF32 in any matmul), "tf32" float32 inputs with PyTorch's TF32 matmuls allowed.
PRECISIONS = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"), "bf16": (torch.bfloat16, "highest")}
#: the precisions each kind of op is timed in: on the CPU float32 only (as `make bench` always did)
ELEMENTWISE = ("fp32",) if DEVICE == "cpu" else ("fp32", "bf16")
MATMUL = ("fp32",) if DEVICE == "cpu" else ("tf32", "fp32", "bf16")


@contextlib.contextmanager
def precision(name: str):
    """PyTorch's float32 matmul precision set as ``name`` says for the block; yields its dtype."""
    dtype, matmul = PRECISIONS[name]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul)
    try:
        yield dtype
    finally:
        torch.set_float32_matmul_precision(before)


def impl_params(names) -> list:
    """``names`` as pytest parameters, the baselines (benchmarks/speedups.py) marked ``baseline``."""
    return [pytest.param(n, marks=pytest.mark.baseline) if is_baseline(n) else n for n in names]


def pytest_configure(config):
    config.addinivalue_line("markers", "baseline: a baseline implementation (upstream, reference, compiled)")


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


#: the peak-memory probes of a fresh CPU process (on the GPU `measure` records it)
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="peak memory on the GPU: recorded by measure")


def nbytes(*tensors) -> int:
    """Bytes of the tensors (lists of tensors too): each read or written once is the least traffic."""
    return sum(nbytes(*t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size() for t in tensors)


# ---- GPU timing --------------------------------------------------------------------------------

#: how a GPU case is timed (also written into the results, so the report says how it timed)
GPU_METHOD = dict(
    warmup_calls=2,  # before anything is timed: compiles, autotuning, allocator
    host_calls=20,  # the host loop's calls at most (fewer for slow calls: host_budget_s)
    host_budget_s=0.1,
    min_rounds=3,
    max_rounds=100,
    round_budget_s=0.3,  # rounds: as many as fit, within [min_rounds, max_rounds]
    flush_mib=256,  # the L2 flush reads this many MiB, and at least 4× the GPU's L2
    min_hold_s=20e-6,  # the spin kernel before each round: 2× the host's time per call, within
    max_hold_s=20e-3,
)


@dataclass
class Timing:
    """Kernel time by device events (median and min over ``rounds``, one call each); the host path:
    ``host_issue`` per call of a loop of ``host_calls`` calls until the loop returns (no
    synchronisation inside), ``host_loop`` until the device has finished them."""

    median: float
    min: float
    rounds: int
    host_issue: float
    host_loop: float
    host_calls: int
    hold: float


def _clamp(x: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, x)))


def time_call(fn, clock, method: dict = GPU_METHOD) -> Timing:
    """Time ``fn`` on ``clock``'s device (:class:`CudaClock`, or a stand-in in the tests).

    After the warm-up calls: one call with a synchronisation (an estimate), then the host loop,
    then the rounds. Each round flushes the L2, queues a spin kernel that keeps the device busy
    for twice the host's time per call (so the call's launches are all queued before the device
    reaches them: the events time the device's work, not the launch gaps of a slow host), and
    records events around one call. One synchronisation after all rounds."""
    now = clock.now
    for _ in range(method["warmup_calls"]):
        fn()
    clock.sync()
    t0 = now()
    fn()
    clock.sync()
    single = now() - t0
    calls = _clamp(method["host_budget_s"] / max(single, 1e-9), 1, method["host_calls"])
    t0 = now()
    for _ in range(calls):
        fn()
    issued = now()
    clock.sync()
    done = now()
    host_issue, host_loop = (issued - t0) / calls, (done - t0) / calls
    hold = min(max(2 * host_issue, method["min_hold_s"]), method["max_hold_s"])
    rounds = _clamp(method["round_budget_s"] / (single + hold), method["min_rounds"], method["max_rounds"])
    marks = []
    for _ in range(rounds):
        clock.flush()
        clock.hold(hold)
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.sync()
    times = [clock.elapsed(start, end) for start, end in marks]
    return Timing(statistics.median(times), min(times), rounds, host_issue, host_loop, calls, hold)


class CudaClock:
    """The device side of :func:`time_call` on the current CUDA device."""

    def __init__(self, flush_mib: int = GPU_METHOD["flush_mib"]):
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        self.flush_bytes = max(flush_mib << 20, 4 * l2)
        self.flush_buffer = torch.ones(self.flush_bytes // 4, dtype=torch.int32, device="cuda")
        self.cycles_per_second = self._spin_rate()

    @staticmethod
    def _spin_rate() -> float:
        """Cycles per second of torch.cuda._sleep's spin loop, measured (clocks vary)."""
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm-up
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    now = staticmethod(time.perf_counter)  # the host's clock

    def sync(self) -> None:
        torch.cuda.synchronize()

    def flush(self) -> None:
        """Fill the L2 with other data by reading it: the lines it leaves are clean, so the timed call
        does not pay for writing back a flush's dirty lines (as after a write such as zero_())."""
        self.flush_buffer.sum()

    def hold(self, seconds: float) -> None:
        torch.cuda._sleep(max(1, int(seconds * self.cycles_per_second)))

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3

    def peak_extra_mib(self, fn) -> float:
        """CUDA memory one more call of ``fn`` adds at its peak."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


_clock: CudaClock | None = None


def _jsonl(record: dict) -> None:
    """Append one JSON line to BUSSEG_BENCH_JSONL (when set), at once."""
    path = os.environ.get("BUSSEG_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def gpu_clock() -> CudaClock:
    global _clock
    if _clock is None:
        _clock = CudaClock()
        props = torch.cuda.get_device_properties(0)
        method = dict(GPU_METHOD, flush_bytes=_clock.flush_bytes, l2_bytes=getattr(props, "L2_cache_size", 0))
        _jsonl({"kind": "method", **method})
    return _clock


def measure_gpu(group: str, impl: str, prec: str, fn, traffic: int | None = None, clock=None) -> dict:
    """Time ``fn`` on the GPU (:func:`time_call`), record its row (and append it to
    BUSSEG_BENCH_JSONL) and return it."""
    clock = clock or gpu_clock()
    timing = time_call(fn, clock)
    row = dict(group=group, impl=impl, precision=prec, **asdict(timing), peak_mib=clock.peak_extra_mib(fn))
    if traffic is not None:
        row["bytes"] = traffic
    _gpu_rows.append(row)
    _jsonl({"kind": "row", **row})
    return row


@pytest.fixture
def measure(request):
    """``measure(group, fn, traffic=None, rounds=ROUNDS, warmup_rounds=1)``: time ``fn``, the case of
    implementation ``impl`` (the test's parameter, else its name) in ``group``. CPU: pytest-benchmark
    (``rounds``); GPU: :func:`measure_gpu`. ``traffic``: the least bytes the call must move."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    impl = params.get("impl", request.node.originalname.removeprefix("test_"))

    def run(group: str, fn, traffic: int | None = None, rounds: int = ROUNDS, warmup_rounds: int = 1):
        if DEVICE == "cpu":
            benchmark = request.getfixturevalue("benchmark")
            benchmark.group = group
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds)
        else:
            measure_gpu(group, impl, params.get("prec", "fp32"), fn, traffic)

    return run


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
    if DEVICE != "cpu":
        if _gpu_rows:
            terminalreporter.write_line("\n" + "\n".join(gpu_table(_gpu_rows)))
        return
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    minima: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in getattr(session, "benchmarks", []) or []:
        params = bench.params or {}
        impl = params.get("impl") or (bench.name.split("[", 1)[1].rstrip("]") if "[" in bench.name else bench.name)
        medians[bench.group][impl] = bench.stats.median
        minima[bench.group][impl] = bench.stats.min
    if not medians and not _memory:
        return
    table = "\n".join(summary_table(medians, minima, _memory))
    terminalreporter.write_line("\n" + table)
    with open(os.path.join(os.path.dirname(__file__), "last_run.md"), "a") as f:
        f.write(table + "\n\n")
