"""`make gpu-check`: build, probe, benchmark and test the GPU code on a machine with a CUDA GPU.

The phases run in the order of their value (build, exception probe, our kernels timed, every CUDA
and Triton test, the baselines), each printed with its wall time, and benchmarks/RESULTS_GPU.md is
rewritten after every phase, so that a lease cut short still leaves a report. Nothing is fetched:
GPU machines often have no registry. The phases, the options and the report: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tools")]
import gpu_exception_probe  # noqa: E402
from speedups import COPY_GROUP, copy_rate, gpu_table, grouped, is_baseline, microseconds  # noqa: E402

OUT = ROOT / "build" / "gpu-check"
RESULTS = ROOT / "benchmarks" / "RESULTS_GPU.md"
#: the copy first (the yardstick), the CRA loss's torch.compile baseline (a target) early, 65 536² last
BENCHMARKS = ("bench_copy", "bench_cra", "bench_arp", "bench_phnet")
NATIVE_SOURCES = ("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "setup.py")
PHASES = ("probe", "bench", "tests", "baselines")
#: time.monotonic() at which --time-limit runs out (None: no limit)
deadline: float | None = None
PASSED, FAILED, OUT_OF_TIME, SKIPPED = "passed", "FAILED", "stopped at the time limit", "up to date"


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None."""
    if shutil.which("nvcc") is None:
        return "nvcc not found"
    try:
        import torch
    except ImportError:
        return f"{sys.executable} has no torch"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} in {sys.executable} sees no CUDA device"
    return None


def run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> str:
    """Run ``cmd`` in the repository, its output to the terminal (and ``log``): PASSED, FAILED, or
    OUT_OF_TIME where the time limit stopped it (or left it no time to start)."""
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        return OUT_OF_TIME
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as f:
        # a session of its own, so that the time limit stops its children (pytest's workers) too
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        stopped = threading.Event()

        def stop():
            stopped.set()
            with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(remaining, stop) if remaining is not None else None
        if timer:
            timer.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        code = proc.wait()
        if timer:
            timer.cancel()
    if stopped.is_set():
        return OUT_OF_TIME
    return PASSED if code == 0 else FAILED


def venv_python(venv: Path = ROOT / ".venv") -> str:
    """``venv``'s python; where it is missing, it is created seeing every package of the python
    running this (torch, triton, pytest). ``--system-site-packages`` alone is not enough: made from
    a python that is itself a venv's (as on many GPU machines), it would see the base python's."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
        own = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        parents = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
        Path(own, "gpu_check_parent_site.pth").write_text("\n".join(parents) + "\n")
    return str(python)


_HAS_CUDA_KERNELS = "import busseg_ops; assert 'cuda' in busseg_ops.available_backends('cuda'), 'no CUDA kernels built'"


def built(python: str, root: Path = ROOT) -> bool:
    """Whether the extension is built with its CUDA kernels and no native source is newer."""
    libs = glob.glob(str(root / "busseg_ops" / "_C*.so"))
    if not libs:
        return False
    newest = max(
        os.path.getmtime(p) for pattern in NATIVE_SOURCES for p in glob.glob(str(root / pattern), recursive=True)
    )
    if newest > min(map(os.path.getmtime, libs)):
        return False
    return subprocess.run([python, "-c", _HAS_CUDA_KERNELS], cwd=root, capture_output=True).returncode == 0


def build(python: str, arch: str) -> str:
    if built(python):
        return SKIPPED
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 1))
    outcome = run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], env)
    if outcome != PASSED:
        return outcome
    # the CUDA kernels must be in the build (setup.py leaves them out where torch lacks CUDA)
    return run([python, "-c", _HAS_CUDA_KERNELS], env)


def probe(python: str) -> str:
    return run([python, "tools/gpu_exception_probe.py", "--json", str(OUT / "probe.json")], log=OUT / "probe.log")


def tests(python: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [python, "-m", "pytest", "tests", "-q", "-k", "cuda or triton", "-p", "no:cacheprovider", "-rfE"]
    cmd += ["--durations=15"]
    if subprocess.run([python, "-c", "import xdist"], capture_output=True).returncode == 0:
        cmd += ["-n", str(min(16, os.cpu_count() or 1))]  # Triton compiles in parallel
    return run(cmd, env, OUT / "tests.log")


def benchmarks(python: str, selection: str, log: Path) -> str:
    """The benchmark files in one process (-m ``selection``); rows appended to OUT/bench.jsonl."""
    env = dict(os.environ, BUSSEG_BENCH_DEVICE="cuda", BUSSEG_BENCH_JSONL=str(OUT / "bench.jsonl"))
    cmd = [python, "-m", "pytest", *(f"benchmarks/{b}.py" for b in BENCHMARKS), "-q", "-m", selection]
    return run(cmd + ["-p", "no:warnings", "-p", "no:cacheprovider", "-rfE"], env, log)


def environment(python: str) -> list[str]:
    """Date, GPU, driver, CUDA, torch and triton of this run, as report lines."""
    probe = (
        "import torch, triton; p = torch.cuda.get_device_properties(0); "
        "print(f'{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}'); "
        "print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
    )
    gpu, versions = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.splitlines()[:2]
    driver = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        if shutil.which("nvidia-smi")
        else "unknown (no nvidia-smi)"
    )
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    inherited = ", ".join(f"{v}={os.environ.get(v, '(unset)')}" for v in gpu_exception_probe.SETTING_VARIABLES)
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- GPU: {gpu}",
        f"- driver: {driver}; nvcc: {nvcc}",
        f"- {versions}",
        f"- environment: {inherited}",
    ]


# ---- what the report says ----------------------------------------------------------------------

ARP_FORWARD, ARP_BOTH = "arp forward", "arp fwd+bwd"
GREEDY, PATCHES = "cra greedy sampling", "hardness+cutmix B=8 512² N=16"
CONTRASTIVE_8K, CONTRASTIVE_64K = "contrastive fwd+bwd N=N⁻=8192 D=256", "contrastive fwd+bwd N=N⁻=65536 D=256"
CRA_LOSS = "cra loss fwd+bwd"
#: the op whose default GPU backend a group's cuda/triton rows decide (issue 28 item 4)
GROUP_OPS = {
    ARP_FORWARD: "adjacent_relation_propagation",
    ARP_BOTH: "adjacent_relation_propagation",
    PATCHES: "patch_entropy_hardness (the cutmix is CUDA's in both rows)",
    CONTRASTIVE_8K: "memory_contrastive_loss",
    CONTRASTIVE_64K: "memory_contrastive_loss",
    CRA_LOSS: "cross_layer_alignment_loss",
}


@dataclass(frozen=True)
class Target:
    """One target of issue 27 or 28, checked per precision and implementation. ``group`` None:
    every group whose rows count their least traffic (the bandwidth target)."""

    issue: int
    text: str
    group: str | None
    precisions: tuple[str, ...]
    impls: tuple[str, ...] = ("cuda", "triton")
    at_most_s: float | None = None  # kernel median at most
    copy_share: float | None = None  # least traffic per second at least this share of the copy's
    over: str | None = None  # a baseline of the same group and precision ...
    speedup: float | None = None  # ... that ours must beat by this factor (kernel medians)


TARGETS = (
    Target(27, "ARP forward ≤ 20 µs", ARP_FORWARD, ("fp32", "bf16"), at_most_s=20e-6),
    Target(27, "ARP forward + backward ≤ 60 µs", ARP_BOTH, ("fp32", "bf16"), at_most_s=60e-6),
    Target(27, "greedy sampling ≤ 0.35 ms", GREEDY, ("fp32", "bf16"), impls=("cuda",), at_most_s=0.35e-3),
    Target(27, "hardness + cutmix ≤ 70 µs", PATCHES, ("fp32", "bf16"), at_most_s=70e-6),
    Target(27, "each memory-bound kernel ≥ 50 % of the copy", None, ("fp32", "bf16"), copy_share=0.5),
    Target(
        28, "contrastive 8192² fwd+bwd ≤ 0.4 ms in TF32 and bf16", CONTRASTIVE_8K, ("tf32", "bf16"), at_most_s=0.4e-3
    ),
    Target(28, "contrastive 8192² fwd+bwd ≤ 1.0 ms in exact fp32", CONTRASTIVE_8K, ("fp32",), at_most_s=1e-3),
    Target(28, "contrastive 65 536² fwd+bwd ≤ 25 ms", CONTRASTIVE_64K, ("tf32", "bf16"), at_most_s=25e-3),
    Target(28, "CRA loss fwd+bwd ≤ 0.5 ms in TF32", CRA_LOSS, ("tf32",), at_most_s=0.5e-3),
    Target(
        28,
        "CRA loss fwd+bwd ≥ 2× torch.compile of the reference at the same precision",
        CRA_LOSS,
        ("tf32", "fp32", "bf16"),
        over="compiled_reference",
        speedup=2.0,
    ),
)


def target_rows(rows: list[dict], targets=TARGETS) -> list[str]:
    """Markdown: each target per precision and implementation, the measured value, met or not."""
    cases = grouped(rows)
    copy = copy_rate(rows)
    lines = ["| issue | target | precision | implementation | measured | |", "|---|---|---|---|---|---|"]
    for t in targets:
        groups = [t.group] if t.group else [g for g, _ in cases if g != COPY_GROUP]
        for group in dict.fromkeys(groups):
            for prec in t.precisions:
                impls = cases.get((group, prec), {})
                if t.group is None and not any("bytes" in r for r in impls.values()):
                    continue
                for impl in t.impls:
                    r = impls.get(impl)
                    label = t.text if t.group else f"{t.text}: {group}"
                    if r is None:
                        lines.append(f"| {t.issue} | {label} | {prec} | {impl} | not measured | |")
                        continue
                    measured, met = _check(t, r, impls, copy)
                    verdict = "" if met is None else "met" if met else "**not met**"
                    lines.append(f"| {t.issue} | {label} | {prec} | {impl} | {measured} | {verdict} |")
    return lines


def _check(t: Target, r: dict, impls: dict, copy: float | None) -> tuple[str, bool | None]:
    if t.at_most_s is not None:
        return f"{microseconds(r['median'])} µs", r["median"] <= t.at_most_s
    if t.copy_share is not None:
        if copy is None:
            return "no copy measured", None
        share = r["bytes"] / r["median"] / copy
        return f"{100 * share:.0f} % ({r['bytes'] / r['median'] / 1e9:.0f} GB/s)", share >= t.copy_share
    base = impls.get(t.over)
    if base is None:
        return f"{microseconds(r['median'])} µs; {t.over} not measured", None
    ratio = base["median"] / r["median"]
    return f"{ratio:.1f}× ({microseconds(r['median'])} vs {microseconds(base['median'])} µs)", ratio >= t.speedup


def backend_rows(rows: list[dict]) -> list[str]:
    """Markdown: per op, group and precision the CUDA and Triton kernel medians and the faster;
    then per op the backend faster in most cases (issue 28 item 4: the default GPU backend)."""
    lines = [
        "| op | group | precision | cuda (µs) | triton (µs) | faster |",
        "|---|---|---|---|---|---|",
    ]
    wins: dict[str, list[tuple[str, str]]] = {}  # op -> [(faster, "group precision")]
    for (group, prec), impls in grouped(rows).items():
        if group not in GROUP_OPS or not {"cuda", "triton"} <= set(impls):
            continue
        cuda, triton = impls["cuda"]["median"], impls["triton"]["median"]
        faster = "cuda" if cuda <= triton else "triton"
        ratio = max(cuda, triton) / min(cuda, triton)
        wins.setdefault(GROUP_OPS[group], []).append((faster, f"{group} {prec}"))
        lines.append(
            f"| {GROUP_OPS[group]} | {group} | {prec} | {microseconds(cuda)} | {microseconds(triton)} "
            f"| {faster} ({ratio:.2f}×) |"
        )
    lines.append("")
    for op, w in wins.items():
        count = {b: [case for faster, case in w if faster == b] for b in ("cuda", "triton")}
        best, other = sorted(count, key=lambda b: -len(count[b]))
        if len(count[best]) == len(count[other]):
            lines.append(
                f"- {op}: no single winner; cuda in {', '.join(count['cuda'])}; triton in {', '.join(count['triton'])}"
            )
        else:
            rest = f"; {other} in {', '.join(count[other])}" if count[other] else ""
            lines.append(f"- {op}: **{best}** (faster in {len(count[best])} of {len(w)} cases{rest})")
    return lines


def method_text(method: dict | None) -> list[str]:
    """How the GPU rows were timed, from the method record benchmarks/conftest.py wrote."""
    if method is None:
        return ["No benchmark ran."]
    return [
        "Kernel time: CUDA events around one call per round. Before each round the L2 is flushed (a "
        f"{method['flush_bytes'] / 2**20:.0f} MiB buffer read, which leaves clean lines, so the timed call pays no "
        f"write-back of the flush; this GPU's L2: {method['l2_bytes'] / 2**20:.0f} MiB) and "
        "a spin kernel (`torch.cuda._sleep`) holds the GPU for twice the host's time per call, so that all "
        "of the call's launches are queued before the GPU reaches them: the events time the device's work, "
        "not a slow host's launch gaps (a host synchronisation inside the call still counts). "
        f"{method['min_rounds']}–{method['max_rounds']} rounds per case (as many as fit "
        f"{method['round_budget_s']:g} s), median and min, after {method['warmup_calls']} warm-up calls.",
        "",
        f"Host path: the call up to {method['host_calls']} times in a loop without synchronising (fewer where "
        f"the calls would take over {method['host_budget_s']:g} s), wall time per call until the loop "
        "returned (issue) and until the GPU had finished them (loop). Where issue ≈ loop > kernel, the host "
        "(or a synchronisation in the op) is what bounds the op's rate.",
        "",
        "Precision: fp32 = float32 inputs with `torch.set_float32_matmul_precision('highest')` (no TF32), "
        "tf32 = float32 inputs with 'high' (PyTorch's TF32 matmuls), bf16 = bfloat16 inputs. GB/s: the "
        "least traffic (each input read, each output written once) over the kernel median, where the op is "
        "bound by memory, against a device-to-device copy of 1 GiB (bytes read and written).",
    ]


def read_rows(path: Path) -> tuple[dict | None, list[dict]]:
    """The method record and the rows from the benchmarks' JSON lines (a line cut by a kill is skipped)."""
    method, rows = None, []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                kind = record.pop("kind", None)
                if kind == "method":
                    method = record
                elif kind == "row":
                    rows.append(record)
    return method, rows


def probe_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["The probe did not run."]
    outcomes = [gpu_exception_probe.Outcome(**o) for o in json.loads(path.read_text())]
    lines = [gpu_exception_probe.summary(outcomes), "", *gpu_exception_probe.table(outcomes)]
    for o in outcomes:
        if o.native_backtrace:
            lines += ["", f"gdb backtrace of '{o.case}' ({o.setting}):", "", "```", o.native_backtrace, "```"]
    return lines


def report(env: list[str], phases: list[tuple[str, str, float]], total: float, limit: float | None) -> str:
    method, rows = read_rows(OUT / "bench.jsonl")
    ours = [r for r in rows if not is_baseline(r["impl"])]
    limit_text = "" if limit is None else f" (time limit {limit:.0f} s)"
    return "\n".join(
        [
            "# GPU check (`make gpu-check`)",
            "",
            "Written by tools/gpu_check.py; every number below is from this one run.",
            "",
            *env,
            "",
            "| phase | result | wall time (s) |",
            "|---|---|---|",
            *(f"| {name} | {outcome} | {secs:.0f} |" for name, outcome, secs in phases),
            f"| total{limit_text} | | {total:.0f} |",
            "",
            "## How the kernels were timed",
            "",
            *method_text(method),
            "",
            "## Exceptions probe (tools/gpu_exception_probe.py)",
            "",
            *probe_lines(OUT / "probe.json"),
            "",
            "## Issue 27's and 28's targets (kernel medians)",
            "",
            *target_rows(rows),
            "",
            "## The faster backend per op (issue 28 item 4)",
            "",
            *backend_rows(ours),
            "",
            "## Every timing",
            "",
            *gpu_table(rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    global deadline
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop at this many seconds")
    parser.add_argument("--only", metavar="PHASES", help=f"comma-separated, of {', '.join(PHASES)}")
    args = parser.parse_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit:g}")
    only = PHASES if args.only is None else tuple(p.strip() for p in args.only.split(","))
    if not only or set(only) - set(PHASES):
        parser.error(f"--only takes phases of {', '.join(PHASES)}, got {args.only!r}")
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: no CUDA GPU here ({reason}): nothing ran")
        return 0
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in ("bench.jsonl", "probe.json"):
        (OUT / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    if args.time_limit is not None:
        deadline = time.monotonic() + args.time_limit
    python = venv_python()
    env = environment(python)
    steps = {
        "probe": ("exceptions probe", lambda: probe(python)),
        "bench": ("GPU benchmarks: ours", lambda: benchmarks(python, "not baseline", OUT / "bench.log")),
        "tests": ("CUDA and Triton tests", lambda: tests(python)),
        "baselines": ("GPU benchmarks: baselines", lambda: benchmarks(python, "baseline", OUT / "baselines.log")),
    }
    todo = [(f"build (TORCH_CUDA_ARCH_LIST={major}.{minor})", lambda: build(python, f"{major}.{minor}"))]
    todo += [steps[p] for p in PHASES if p in only]
    phases: list[tuple[str, str, float]] = []
    for name, phase in todo:
        t0 = time.perf_counter()
        outcome = phase()
        phases.append((name, outcome, time.perf_counter() - t0))
        print(f"gpu-check: {name}: {outcome} in {phases[-1][2]:.0f} s", flush=True)
        RESULTS.write_text(report(env, phases, time.perf_counter() - started, args.time_limit))
        if outcome not in (PASSED, SKIPPED) and name.startswith("build"):
            break  # nothing else can run without the extension
    total = time.perf_counter() - started
    text = RESULTS.read_text()
    # the end of the output is what a lent machine's reply carries: the phases, the probe, the targets
    print("\n" + text[text.index("| phase |") : text.index("## How the kernels")].strip())
    print(text[text.index("## Exceptions probe") : text.index("## Every timing")].strip())
    written = f"{os.path.relpath(RESULTS, ROOT)} written (logs in {os.path.relpath(OUT, ROOT)})"
    print(f"gpu-check: {written}; total {total:.0f} s")
    return 0 if all(outcome in (PASSED, SKIPPED) for _, outcome, _ in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
