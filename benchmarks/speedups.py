"""Which implementations of a benchmark group are baselines, and the speed-ups against them: shared
by the CPU table (benchmarks/conftest.py) and the GPU report (tools/gpu_check.py). No torch."""

#: name prefixes of the baselines (upstream code, reference formulations, torch.compile of them)
BASELINES = ("upstream", "unfold", "reference", "compiled", "baseline")


def is_baseline(impl: str) -> bool:
    return impl.startswith(BASELINES)


def speedups(times: dict[str, float], impl: str) -> str:
    """'12.3× unfold, 4.5× compiled_unfold': each baseline's time over impl's, in the order of
    ``times`` (empty for a baseline, or where impl has no time)."""
    t = times.get(impl)
    if not t or is_baseline(impl):
        return ""
    return ", ".join(f"{times[b] / t:.1f}× {b}" for b in times if is_baseline(b))
