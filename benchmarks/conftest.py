"""Benchmark plumbing: each case is `benchmark(fn)` with `benchmark.group` naming the problem and
`benchmark.name`'s parameter naming the implementation; peak memory goes through the
`record_memory` fixture. At the end a Markdown table of medians, speed-ups against every
baseline of the same group (all from this one run) and peak memory is printed and appended to
benchmarks/last_run.md (`make bench` clears it first and runs each file in a process of its own,
so one benchmark's leftovers — compiled graphs, allocator state — cannot slow another's)."""

import os
import sys
from collections import defaultdict

import pytest

sys.path.insert(0, os.path.dirname(__file__))
_memory: dict[str, dict[str, float]] = defaultdict(dict)


@pytest.fixture
def record_memory():
    def record(group: str, impl: str, mib: float) -> None:
        _memory[group][impl] = mib

    return record


def _is_baseline(impl: str) -> bool:
    return impl.startswith(("upstream", "unfold", "reference", "compiled", "baseline"))


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in getattr(session, "benchmarks", []) or []:
        impl = bench.name.split("[", 1)[1].rstrip("]") if "[" in bench.name else bench.name
        times[bench.group][impl] = bench.stats.median
    if not times and not _memory:
        return
    lines = [
        "| group | implementation | median (ms) | speed-up vs baselines | peak extra MiB |",
        "|---|---|---|---|---|",
    ]
    for group in sorted(set(times) | set(_memory)):
        impls = list(dict.fromkeys(list(times.get(group, {})) + list(_memory.get(group, {}))))
        baselines = [i for i in impls if _is_baseline(i) and i in times.get(group, {})]
        for impl in impls:
            t = times.get(group, {}).get(impl)
            ratios = ", ".join(
                f"{times[group][b] / t:.1f}× {b}" for b in baselines if t and b != impl and not _is_baseline(impl)
            )
            mem = _memory.get(group, {}).get(impl)
            lines.append(
                f"| {group} | {impl} | {'' if t is None else f'{t * 1e3:.2f}'} | {ratios} | "
                f"{'' if mem is None else f'{mem:.0f}'} |"
            )
    table = "\n".join(lines)
    terminalreporter.write_line("\n" + table)
    with open(os.path.join(os.path.dirname(__file__), "last_run.md"), "a") as f:
        f.write(table + "\n\n")
