"""benchmarks/conftest.py: the table `make bench` prints (speed-ups by medians and by minima); the GPU
timing (time_call on a simulated device queue), the GPU table, the baseline marks and precisions."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "bench_conftest", Path(__file__).resolve().parent.parent / "benchmarks" / "conftest.py"
)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_conftest"] = bench  # its dataclasses look their module up
spec.loader.exec_module(bench)


def test_speedups_by_medians_and_by_minima():
    # ours fell into a slow mode in some rounds: the median halves the ratio, the minimum does not
    medians = {"arp": {"cpu": 0.016, "unfold": 0.96, "compiled_unfold": 0.8}}
    minima = {"arp": {"cpu": 0.012, "unfold": 0.96, "compiled_unfold": 0.72}}
    memory = {"arp": {"cpu": 37.0, "unfold": 662.0}, "only memory": {"cpu": 5.0}}
    assert bench.summary_table(medians, minima, memory)[2:] == [
        "| arp | cpu | 16.00 | 60.0× unfold, 50.0× compiled_unfold | 80.0× unfold, 60.0× compiled_unfold | 37 |",
        "| arp | unfold | 960.00 |  |  | 662 |",
        "| arp | compiled_unfold | 800.00 |  |  |  |",
        "| only memory | cpu |  |  |  | 5 |",
    ]


class FakeDevice:
    """A device queue in simulated time: the host's clock moves by what the host does, each queued
    piece of work starts when both the host has queued it and the device is free."""

    def __init__(self, flush_s=70e-6, honour_hold=True):
        self.host = 0.0
        self.free = 0.0  # when the device finishes what is queued
        self.flush_s, self.honour_hold = flush_s, honour_hold
        self.log: list[str] = []

    def enqueue(self, seconds: float) -> float:
        start = max(self.host, self.free)
        self.free = start + seconds
        return start

    def now(self) -> float:
        return self.host

    def sync(self):
        self.host = max(self.host, self.free)

    def flush(self):
        self.log.append("flush")
        self.enqueue(self.flush_s)

    def hold(self, seconds):
        self.log.append("hold")
        self.enqueue(seconds if self.honour_hold else 0.0)

    def mark(self):
        self.log.append("mark")
        return self.enqueue(0.0)

    def elapsed(self, start, end):
        return end - start

    def peak_extra_mib(self, fn):
        fn()
        return 3.0

    def call(self, host_s: float, kernels_s: list[float]):
        """An op that spends host_s on the host, then queues its kernels one after another."""

        def fn():
            self.log.append("call")
            self.host += host_s
            for k in kernels_s:
                self.enqueue(k)

        return fn


def test_time_call_times_the_device_not_the_host():
    """A call whose host part (300 µs) is far longer than its kernels (2 × 10 µs): the events give
    the kernels' 20 µs, the host loop the host's 300 µs per call; every round flushes the L2 and
    holds the device before its events."""
    dev = FakeDevice()
    timing = bench.time_call(dev.call(300e-6, [10e-6, 10e-6]), dev)
    assert timing.median == pytest.approx(20e-6) and timing.min == pytest.approx(20e-6)
    assert timing.host_issue == pytest.approx(300e-6) and timing.host_loop == pytest.approx(300e-6, rel=0.01)
    assert timing.hold == pytest.approx(600e-6)
    method = bench.GPU_METHOD
    assert method["min_rounds"] <= timing.rounds <= method["max_rounds"]
    rounds = dev.log[-5 * timing.rounds :]
    assert rounds == ["flush", "hold", "mark", "call", "mark"] * timing.rounds
    assert timing.host_calls == method["host_calls"]
    # without the hold the events would include the host's launch gap: the hold is what matters
    dev = FakeDevice(honour_hold=False)
    assert bench.time_call(dev.call(300e-6, [10e-6, 10e-6]), dev).median > 200e-6


def test_time_call_median_min_and_rounds_of_a_slow_call():
    """Device times that vary by call: the median and min are the rounds' own; a 1 s call gets the
    fewest rounds and a single host-loop call."""
    dev = FakeDevice()
    durations = iter([1.0, 1.0, 1.0, 1.0, 1.2, 0.9, 1.1])  # warm-ups, estimate, host loop, 3 rounds
    fn = dev.call(1e-3, [])
    timed = lambda: (fn(), dev.enqueue(next(durations)))  # noqa: E731
    timing = bench.time_call(timed, dev)
    assert (timing.rounds, timing.host_calls) == (bench.GPU_METHOD["min_rounds"], 1)
    assert timing.median == pytest.approx(1.1) and timing.min == pytest.approx(0.9)
    assert timing.hold == pytest.approx(2e-3)


def test_a_gpu_row_is_appended_to_the_json_lines_at_once(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv("BUSSEG_BENCH_JSONL", str(path))
    dev = FakeDevice()
    bench.measure_gpu("arp forward", "cuda", "bf16", dev.call(50e-6, [20e-6]), traffic=123, clock=dev)
    [line] = path.read_text().splitlines()
    row = json.loads(line)
    assert {k: row[k] for k in ("kind", "group", "impl", "precision", "bytes", "peak_mib")} == dict(
        kind="row", group="arp forward", impl="cuda", precision="bf16", bytes=123, peak_mib=3.0
    )
    assert row["median"] == pytest.approx(20e-6) and row["host_issue"] == pytest.approx(50e-6)


def test_gpu_table_kernel_times_speedups_and_bandwidth():
    def row(group, impl, median, precision="fp32", **extra):
        return dict(
            group=group, impl=impl, precision=precision, median=median, min=median * 0.9, rounds=100,
            host_issue=30e-6, host_loop=40e-6, host_calls=20, hold=60e-6, peak_mib=12.0, **extra,
        )  # fmt: skip

    rows = [
        row("copy", "copy", 1e-3, bytes=2 * 10**9),  # 2000 GB/s
        row("arp", "cuda", 20e-6, bytes=2 * 10**7),  # 1000 GB/s
        row("arp", "cuda", 40e-6, precision="bf16", bytes=10**7),
        row("arp", "unfold", 160e-6),
        row("arp", "compiled_unfold", 2e-3),
    ]
    assert bench.gpu_table(rows)[2:] == [
        "| copy | fp32 | copy | 1000 | 900.0 | 100 | 30.0 / 40.0 |  | 2000 (100 %) | 12 |",
        "| arp | fp32 | cuda | 20.0 | 18.0 | 100 | 30.0 / 40.0 | 8.0× unfold, 100.0× compiled_unfold "
        "| 1000 (50 %) | 12 |",
        "| arp | fp32 | unfold | 160.0 | 144.0 | 100 | 30.0 / 40.0 |  |  | 12 |",
        "| arp | fp32 | compiled_unfold | 2000 | 1800 | 100 | 30.0 / 40.0 |  |  | 12 |",
        "| arp | bf16 | cuda | 40.0 | 36.0 | 100 | 30.0 / 40.0 |  | 250 (12 %) | 12 |",
    ]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # registered by the benchmarks' conftest
def test_baselines_are_marked_and_precisions_set_the_matmul_precision():
    params = bench.impl_params(["cpu", "cuda", "unfold", "compiled_reference", "upstream_chunk_loop"])
    marked = [p.values[0] for p in params if not isinstance(p, str) and any(m.name == "baseline" for m in p.marks)]
    assert marked == ["unfold", "compiled_reference", "upstream_chunk_loop"]
    before = torch.get_float32_matmul_precision()
    with bench.precision("tf32") as dtype:
        assert (dtype, torch.get_float32_matmul_precision()) == (torch.float32, "high")
        with bench.precision("fp32") as dtype:
            assert (dtype, torch.get_float32_matmul_precision()) == (torch.float32, "highest")
    with bench.precision("bf16") as dtype:
        assert dtype == torch.bfloat16
    assert torch.get_float32_matmul_precision() == before
