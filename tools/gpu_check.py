"""`make gpu-check`: on a machine with a CUDA GPU and nvcc, from a clean checkout, in phases, each
printed with its wall time:

1. build: the extension with its CUDA kernels for this GPU's architecture only
   (TORCH_CUDA_ARCH_LIST from its compute capability), installed editable into .venv (where it
   is missing, created seeing the packages of the python running this). Nothing is fetched:
   torch, triton, pytest and the test dependencies come from the machine's python, as GPU
   machines often have no registry.
2. tests: every CUDA and Triton test (pytest -k "cuda or triton"), the Triton kernels compiled
   for the GPU (no interpreter).
3. benchmarks: benchmarks/bench_{copy,arp,cra,phnet}.py with BUSSEG_BENCH_DEVICE=cuda: each op
   on `cuda` and `triton` against its upstream or reference formulation and torch.compile of it
   where the benchmark has one; the memory-bound ops' bandwidth against the measured copy.
4. report: benchmarks/RESULTS_GPU.md (date, GPU, driver, CUDA, torch, triton, the tables).

Without a CUDA GPU (no nvcc, or torch here sees no CUDA device) it prints one line and exits 0.
Exit status 1 when a phase fails; the report is written with whatever ran.

``--time-limit SECONDS`` (for a lent machine's short lease): when the time is up, the command
running is stopped, the phases left are not started, and the report is still written with what
ran (a benchmark file's numbers count once the file has finished).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from speedups import speedups  # noqa: E402 (the benchmarks' own definition of their baselines)

OUT = ROOT / "build" / "gpu-check"
RESULTS = ROOT / "benchmarks" / "RESULTS_GPU.md"
BENCHMARKS = ("bench_copy", "bench_arp", "bench_cra", "bench_phnet")
#: time.monotonic() at which --time-limit runs out (None: no limit)
deadline: float | None = None
PASSED, FAILED, OUT_OF_TIME = "passed", "FAILED", "stopped at the time limit"


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


def worst(*outcomes: str) -> str:
    """A phase's outcome from its commands': stopped by time, else failed, else passed."""
    return next((o for o in (OUT_OF_TIME, FAILED) if o in outcomes), PASSED)


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


def build(python: str, arch: str) -> str:
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 1))
    outcome = run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], env)
    if outcome != PASSED:
        return outcome
    # the CUDA kernels must be in the build (setup.py leaves them out where torch lacks CUDA)
    probe = "import busseg_ops; assert 'cuda' in busseg_ops.available_backends('cuda'), 'no CUDA kernels built'"
    return run([python, "-c", probe], env)


def tests(python: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [python, "-m", "pytest", "tests", "-q", "-k", "cuda or triton", "-p", "no:cacheprovider", "-rfE"]
    cmd += ["--durations=15"]
    if subprocess.run([python, "-c", "import xdist"], capture_output=True).returncode == 0:
        cmd += ["-n", str(min(16, os.cpu_count() or 1))]  # Triton compiles in parallel
    return run(cmd, env, OUT / "tests.log")


def benchmarks(python: str) -> str:
    env = dict(os.environ, BUSSEG_BENCH_DEVICE="cuda")
    outcomes = []
    for name in BENCHMARKS:
        json_path = OUT / f"{name}.json"
        json_path.unlink(missing_ok=True)
        cmd = [python, "-m", "pytest", f"benchmarks/{name}.py", "-q", "-p", "no:warnings", "-p", "no:cacheprovider"]
        outcomes.append(run(cmd + ["--benchmark-columns=min,median,rounds", f"--benchmark-json={json_path}"], env))
    return worst(*outcomes)


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
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- GPU: {gpu}",
        f"- driver: {driver}; nvcc: {nvcc}",
        f"- {versions}",
    ]


def benchmark_table() -> list[str]:
    """One Markdown table from the benchmarks' JSON: median, speed-up against the baselines of the
    same group (one run), bandwidth of the minimal traffic against the copy's, peak extra GPU MiB."""
    rows = []
    for name in BENCHMARKS:
        path = OUT / f"{name}.json"
        if path.exists():
            rows += json.loads(path.read_text())["benchmarks"]
    groups: dict[str, dict[str, dict]] = {}
    for b in rows:
        impl = b["name"].split("[", 1)[1].rstrip("]") if "[" in b["name"] else b["name"]
        groups.setdefault(b["group"], {})[impl] = dict(median=b["stats"]["median"], **b.get("extra_info", {}))
    copy = next(iter(groups.get("copy", {}).values()), None)
    copy_gbs = copy["bytes"] / copy["median"] / 1e9 if copy else None
    lines = [
        "| group | implementation | median (ms) | speed-up vs baselines | GB/s (% of copy) | peak extra MiB |",
        "|---|---|---|---|---|---|",
    ]
    for group, impls in groups.items():
        for impl, r in impls.items():
            t = r["median"]
            ratios = speedups({i: v["median"] for i, v in impls.items()}, impl)
            gbs = r["bytes"] / t / 1e9 if "bytes" in r else None
            bw = "" if gbs is None else f"{gbs:.0f}" + (f" ({100 * gbs / copy_gbs:.0f} %)" if copy_gbs else "")
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
            lines.append(f"| {group} | {impl} | {t * 1e3:.3f} | {ratios} | {bw} | {peak} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    global deadline
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop at this many seconds")
    args = parser.parse_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit:g}")
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: no CUDA GPU here ({reason}): nothing ran")
        return 0
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.time_limit is not None:
        deadline = time.monotonic() + args.time_limit
    phases: list[tuple[str, str, float]] = []
    python = venv_python()
    for name, phase in (
        (f"build (TORCH_CUDA_ARCH_LIST={major}.{minor})", lambda: build(python, f"{major}.{minor}")),
        ("CUDA and Triton tests", lambda: tests(python)),
        ("GPU benchmarks", lambda: benchmarks(python)),
    ):
        t0 = time.perf_counter()
        outcome = phase()
        phases.append((name, outcome, time.perf_counter() - t0))
        print(f"gpu-check: {name}: {outcome} in {phases[-1][2]:.0f} s", flush=True)
        if outcome != PASSED and name.startswith("build"):
            break  # nothing else can run without the extension
    total = time.perf_counter() - started
    limit = "" if args.time_limit is None else f" (time limit {args.time_limit:.0f} s)"
    report = [
        "# GPU check (`make gpu-check`)",
        "",
        "Written by tools/gpu_check.py; every number below is from this one run.",
        "",
        *environment(python),
        "",
        "| phase | result | wall time (s) |",
        "|---|---|---|",
        *(f"| {name} | {outcome} | {secs:.0f} |" for name, outcome, secs in phases),
        f"| total{limit} | | {total:.0f} |",
        "",
        "Benchmarks at the upstream settings (benchmarks/bench_*.py, `BUSSEG_BENCH_DEVICE=cuda`); GB/s: the",
        "least traffic (each input read, each output written once) per second, where the op is bound",
        "by memory, against a device-to-device copy of 1 GiB (bytes read and written).",
        "",
        *benchmark_table(),
        "",
    ]
    RESULTS.write_text("\n".join(report))
    print(f"gpu-check: {RESULTS.relative_to(ROOT)} written; total {total:.0f} s")
    return 0 if all(outcome == PASSED for _, outcome, _ in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
