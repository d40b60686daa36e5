"""The table `make bench` prints (benchmarks/conftest.py): speed-ups by medians and by minima."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bench_conftest", Path(__file__).resolve().parent.parent / "benchmarks" / "conftest.py"
)
bench = importlib.util.module_from_spec(spec)
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
