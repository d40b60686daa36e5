"""Which implementations of a benchmark group are baselines, the speed-ups against them, and the
GPU rows' table: shared by the CPU table (benchmarks/conftest.py), the GPU benchmarks' summary and
the GPU report (tools/gpu_check.py). No torch."""

#: name prefixes of the baselines (upstream code, reference formulations, torch.compile of them)
BASELINES = ("upstream", "unfold", "reference", "compiled", "baseline")
#: the group of the device-to-device copy, the yardstick of the memory-bound ops
COPY_GROUP = "copy"


def is_baseline(impl: str) -> bool:
    return impl.startswith(BASELINES)


def speedups(times: dict[str, float], impl: str) -> str:
    """'12.3× unfold, 4.5× compiled_unfold': each baseline's time over impl's, in the order of
    ``times`` (empty for a baseline, or where impl has no time)."""
    t = times.get(impl)
    if not t or is_baseline(impl):
        return ""
    return ", ".join(f"{times[b] / t:.1f}× {b}" for b in times if is_baseline(b))


def microseconds(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def grouped(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """{(group, precision): {impl: row}} in the order the rows came (a later row of the same case
    replaces an earlier one)."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["group"], r["precision"]), {})[r["impl"]] = r
    return out


def copy_rate(rows: list[dict]) -> float | None:
    """Bytes per second of the copy (bytes read and written over its kernel median), if measured."""
    copy = next((r for r in rows if r["group"] == COPY_GROUP and "bytes" in r), None)
    return copy["bytes"] / copy["median"] if copy else None


def bandwidth(row: dict, copy: float | None) -> str:
    """'1850 GB/s (45 %)': the row's least traffic over its kernel median, against the copy's."""
    if "bytes" not in row:
        return ""
    rate = row["bytes"] / row["median"]
    return f"{rate / 1e9:.0f}" + (f" ({100 * rate / copy:.0f} %)" if copy else "")


def gpu_table(rows: list[dict]) -> list[str]:
    """Markdown table of GPU rows (benchmarks/conftest.py's ``measure_gpu``): kernel median and min by
    CUDA events, the host path per call, speed-ups against the baselines of the same group and
    precision by kernel medians, bandwidth against the copy, peak extra GPU memory."""
    copy = copy_rate(rows)
    lines = [
        "| group | precision | implementation | kernel median (µs) | min (µs) | rounds | host µs/call: issue / loop "
        "| speed-up vs baselines | GB/s (% of copy) | peak extra MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (group, prec), impls in grouped(rows).items():
        medians = {impl: r["median"] for impl, r in impls.items()}
        for impl, r in impls.items():
            host = f"{microseconds(r['host_issue'])} / {microseconds(r['host_loop'])}"
            lines.append(
                f"| {group} | {prec} | {impl} | {microseconds(r['median'])} | {microseconds(r['min'])} | {r['rounds']} "
                f"| {host} | {speedups(medians, impl)} | {bandwidth(r, copy)} | {r['peak_mib']:.0f} |"
            )
    return lines
