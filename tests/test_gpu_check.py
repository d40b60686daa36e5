"""`make gpu-check` (tools/gpu_check.py): one line and exit 0 without a CUDA GPU; the time limit; the
report (targets, backends, the probe's table, every timing) from rows as the benchmarks write them;
the exceptions probe (tools/gpu_exception_probe.py) run on the CPU."""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)
probe = gpu_check.gpu_exception_probe

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="here make gpu-check runs the whole check")


@no_gpu
def test_make_gpu_check_without_a_gpu_says_so_in_one_line():
    # Under `make test` the parent make's flags would make this one print "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    cmd = ["make", "--no-print-directory", "gpu-check"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert (out.returncode, out.stderr) == (0, "")
    [line] = out.stdout.splitlines()
    assert line.startswith("gpu-check: no CUDA GPU here (") and line.endswith("sees no CUDA device): nothing ran")


@no_gpu
def test_without_nvcc_says_so_in_one_line():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # python, but no nvcc on the PATH
    out = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (
        0,
        "gpu-check: no CUDA GPU here (nvcc not found): nothing ran\n",
        "",
    )


def row(group, impl, median, precision="fp32", **extra):
    return dict(
        group=group, impl=impl, precision=precision, median=median, min=median, rounds=100, host_issue=30e-6,
        host_loop=40e-6, host_calls=20, hold=60e-6, peak_mib=1.0, **extra,
    )  # fmt: skip


ROWS = [
    row("copy", "copy", 1e-3, bytes=4 * 10**9),  # 4000 GB/s
    row(gpu_check.ARP_FORWARD, "cuda", 18e-6, bytes=36 * 10**6),  # 2000 GB/s: 50 %
    row(gpu_check.ARP_FORWARD, "triton", 30e-6, bytes=36 * 10**6),
    row(gpu_check.ARP_FORWARD, "cuda", 25e-6, precision="bf16", bytes=18 * 10**6),
    row(gpu_check.ARP_FORWARD, "triton", 19e-6, precision="bf16", bytes=18 * 10**6),
    row(gpu_check.CRA_LOSS, "cuda", 0.45e-3, precision="tf32"),
    row(gpu_check.CRA_LOSS, "triton", 0.6e-3, precision="tf32"),
    row(gpu_check.CRA_LOSS, "compiled_reference", 1.0e-3, precision="tf32"),
]


def test_targets_are_checked_per_precision_and_implementation():
    lines = gpu_check.target_rows(ROWS)
    assert "| 27 | ARP forward ≤ 20 µs | fp32 | cuda | 18.0 µs | met |" in lines
    assert "| 27 | ARP forward ≤ 20 µs | fp32 | triton | 30.0 µs | **not met** |" in lines
    assert "| 27 | ARP forward ≤ 20 µs | bf16 | triton | 19.0 µs | met |" in lines
    assert "| 27 | ARP forward + backward ≤ 60 µs | fp32 | cuda | not measured | |" in lines
    share = "each memory-bound kernel ≥ 50 % of the copy: arp forward"
    assert f"| 27 | {share} | fp32 | cuda | 50 % (2000 GB/s) | met |" in lines
    assert f"| 27 | {share} | fp32 | triton | 30 % (1200 GB/s) | **not met** |" in lines
    assert not any("of the copy: cra loss" in line for line in lines)  # no traffic count: not memory-bound
    assert "| 28 | CRA loss fwd+bwd ≤ 0.5 ms in TF32 | tf32 | cuda | 450.0 µs | met |" in lines
    compiled = "CRA loss fwd+bwd ≥ 2× torch.compile of the reference at the same precision"
    assert f"| 28 | {compiled} | tf32 | cuda | 2.2× (450.0 vs 1000 µs) | met |" in lines
    assert f"| 28 | {compiled} | tf32 | triton | 1.7× (600.0 vs 1000 µs) | **not met** |" in lines
    assert f"| 28 | {compiled} | fp32 | cuda | not measured | |" in lines


def test_every_target_group_is_a_benchmark_group():
    """The targets name the groups the benchmark files time (a renamed group would leave a target
    'not measured' for good)."""
    sources = "".join(p.read_text() for p in (ROOT / "benchmarks").glob("bench_*.py"))
    for group in {t.group for t in gpu_check.TARGETS if t.group} | set(gpu_check.GROUP_OPS):
        assert f'"{group}"' in sources, group


def test_the_faster_backend_per_op():
    lines = gpu_check.backend_rows([r for r in ROWS if r["impl"] in ("cuda", "triton")])
    assert lines[2:5] == [
        "| adjacent_relation_propagation | arp forward | fp32 | 18.0 | 30.0 | cuda (1.67×) |",
        "| adjacent_relation_propagation | arp forward | bf16 | 25.0 | 19.0 | triton (1.32×) |",
        "| cross_layer_alignment_loss | cra loss fwd+bwd | tf32 | 450.0 | 600.0 | cuda (1.33×) |",
    ]
    assert "- cross_layer_alignment_loss: **cuda** (faster in 1 of 1 cases)" in lines
    # a later row of the same case replaces the earlier: arp forward bf16 on cuda now faster than triton
    rerun = dict(ROWS[3], median=18e-6)
    lines = gpu_check.backend_rows([r for r in ROWS if r["impl"] in ("cuda", "triton")] + [rerun])
    assert "- adjacent_relation_propagation: **cuda** (faster in 2 of 2 cases)" in lines


def test_the_report_is_written_from_whatever_ran(tmp_path, monkeypatch):
    """Rows as benchmarks/conftest.py appends them (a last line cut by a kill is skipped), the probe's
    outcomes; the report says how it timed, the targets, the backends and every row."""
    monkeypatch.setattr(gpu_check, "OUT", tmp_path)
    method = dict(
        warmup_calls=2, host_calls=20, host_budget_s=0.1, min_rounds=3, max_rounds=100, round_budget_s=0.3,
        flush_bytes=256 << 20, l2_bytes=60 << 20,
    )  # fmt: skip
    lines = [json.dumps({"kind": "method", **method})] + [json.dumps({"kind": "row", **r}) for r in ROWS]
    (tmp_path / "bench.jsonl").write_text("\n".join(lines) + '\n{"kind": "row", "gro')
    arp, greedy = (next(c.name for c in probe.CASES if c.name.startswith(s)) for s in ("ARP forward", "greedy"))
    outcomes = [
        probe.Outcome(arp, "stacktraces 0", "raised ValueError", True, "x"),
        probe.Outcome(greedy, "stacktraces 0", "SIGSEGV", False, "", "Fatal Python error: Segmentation fault"),
    ]
    (tmp_path / "probe.json").write_text(json.dumps([dataclasses.asdict(o) for o in outcomes]))
    text = gpu_check.report(["- GPU: a test"], [("build", gpu_check.PASSED, 90.0)], 100.0, 540.0)
    assert "| total (time limit 540 s) | | 100 |" in text
    assert "a 256 MiB buffer read" in text and "this GPU's L2: 60 MiB" in text and "3–100 rounds per case" in text
    assert "1 of 2 CUDA-binding calls did not raise cleanly (stacktraces 0: 1 of 2)." in text
    assert f"| {greedy} | SIGSEGV |" in text
    assert "| 27 | ARP forward ≤ 20 µs | fp32 | cuda | 18.0 µs | met |" in text
    assert (
        "- adjacent_relation_propagation: no single winner; cuda in arp forward fp32; triton in arp forward bf16"
        in text
    )
    assert "| arp forward | fp32 | cuda | 18.0 |" in text and "| arp forward | bf16 | triton | 19.0 |" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(gpu_check, "OUT", empty)
    text = gpu_check.report([], [], 1.0, None)
    assert "No benchmark ran." in text and "The probe did not run." in text


def test_built_wants_the_library_newer_than_every_native_source(tmp_path):
    (tmp_path / "busseg_ops").mkdir()
    (tmp_path / "csrc" / "op").mkdir(parents=True)
    source = tmp_path / "csrc" / "op" / "cuda.cu"
    source.write_text("")
    (tmp_path / "setup.py").write_text("")
    assert not gpu_check.built(sys.executable, tmp_path)  # no library
    lib = tmp_path / "busseg_ops" / "_C.cpython-312-x86_64-linux-gnu.so"
    lib.write_text("")
    os.utime(source, (time.time() + 60, time.time() + 60))
    assert not gpu_check.built(sys.executable, tmp_path)  # a source newer than the library
    os.utime(source, (time.time() - 60, time.time() - 60))
    os.utime(tmp_path / "setup.py", (time.time() - 60, time.time() - 60))
    # up to date, but this busseg_ops (an empty folder) has no CUDA kernels
    assert not gpu_check.built(sys.executable, tmp_path)


def test_the_venv_it_creates_sees_this_pythons_packages(tmp_path):
    """Made from a python that is itself a venv's (this one, as on the GPU machines), the new venv
    still imports torch from it, and pip too (it has none of its own)."""
    python = gpu_check.venv_python(tmp_path / "venv")
    probe = "import sys, torch, pip; print(sys.prefix)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "venv")


def test_the_time_limit_stops_the_command_and_its_children(monkeypatch, tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(120)"
    )
    monkeypatch.setattr(gpu_check, "deadline", time.monotonic() + 3)
    t0 = time.monotonic()
    assert gpu_check.run([sys.executable, "-c", script]) == gpu_check.OUT_OF_TIME
    assert time.monotonic() - t0 < 60
    child = int(pid_file.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init shortly after
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the command's child {child} outlived the time limit")
    # with the time spent, the next command is not started
    assert gpu_check.run([sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"]) == gpu_check.OUT_OF_TIME
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_time_limit_is_refused_in_one_line(value):
    out = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--time-limit", value], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    last = out.stderr.splitlines()[-1]
    assert last.startswith("gpu_check.py: error:") and "--time-limit" in last and value in last


@pytest.mark.parametrize("value", ["", "probe,bogus", "all"])
def test_a_bad_phase_list_is_refused_in_one_line(value):
    out = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--only", value], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    last = out.stderr.splitlines()[-1]
    assert last.startswith("gpu_check.py: error:") and "--only" in last and "probe" in last


@no_gpu
def test_make_gpu_check_only_probe_without_a_gpu_says_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "--no-print-directory", "gpu-check", "ONLY=probe", "TIME_LIMIT=60"],
                         cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1, out.stdout + out.stderr


# ---- the exceptions probe (tools/gpu_exception_probe.py) --------------------------------------


@pytest.mark.parametrize("case", probe.CASES, ids=lambda c: c.name)
def test_each_probe_call_reaches_the_check_it_names(case, capsys):
    """Each probe case, run here on CPU tensors (the same checks.h as its CUDA binding), raises its
    op's own check, so on the GPU it reaches the binding's check too (a schema change fails here)."""
    with pytest.raises(SystemExit) as end:
        exec(probe.script(case, device="cpu"), {"__name__": "probe_case"})
    out = capsys.readouterr().out
    assert end.value.code == 0, out
    expected = "RuntimeError" if not case.busseg else "ValueError"
    assert out.startswith(f"{probe.MARK_RAISED}{expected}: ") and case.expect in out, out


def test_the_probe_tells_a_raise_a_crash_a_return_and_an_exit_apart(monkeypatch):
    cases = [
        probe.Case("raises", "raise ValueError('bad x')", "bad x", cuda=False, busseg=False),
        probe.Case("segfaults", "import ctypes\nctypes.string_at(0)", "", cuda=False, busseg=False),
        probe.Case("returns", "pass", "", cuda=False, busseg=False),
        probe.Case("exits", "import os\nos._exit(7)", "", cuda=False, busseg=False),
    ]
    outcomes = probe.probe(cases, settings=("stacktraces 0",), jobs=4, gdb=False)
    got = {o.case: o for o in outcomes}
    assert (got["raises"].result, got["raises"].clean, got["raises"].message) == (
        "raised ValueError",
        True,
        "ValueError: bad x",
    )
    assert got["segfaults"].result == "SIGSEGV" and not got["segfaults"].clean
    assert got["segfaults"].crash.startswith("Fatal Python error: Segmentation fault; File ")
    assert (got["returns"].result, got["exits"].result) == ("no error", "exit 7")
    lines = probe.table(outcomes)
    assert lines[0] == "| case | stacktraces 0 | message (first setting) |"
    assert lines[3].startswith("| segfaults | SIGSEGV | ") and "Segmentation fault" in lines[3]


def test_the_probe_summary_counts_the_cuda_bindings_that_crash():
    cuda_cases = [c.name for c in probe.CASES if not c.control]
    control = next(c.name for c in probe.CASES if c.control)
    clean = [probe.Outcome(name, s, "raised ValueError", True) for name in cuda_cases for s in probe.SETTINGS]
    assert probe.summary(clean) == f"Every CUDA binding's exception path raised cleanly ({len(clean)} calls)."
    crashed = []
    for name in cuda_cases:
        for s in probe.SETTINGS:
            ok = s.startswith("stacktraces 0")
            crashed.append(probe.Outcome(name, s, "raised ValueError" if ok else "SIGSEGV", ok))
    n = len(cuda_cases)
    assert probe.summary(crashed) == (
        f"{2 * n} of {4 * n} CUDA-binding calls did not raise cleanly "
        f"(stacktraces 1: {n} of {n}; stacktraces 1, no addr2line: {n} of {n})."
    )
    # a control that crashes too is said apart; the CUDA bindings' sentence stays
    controls = [probe.Outcome(control, "stacktraces 0", "SIGABRT", False)]
    assert probe.summary(clean + controls) == (
        f"Every CUDA binding's exception path raised cleanly ({len(clean)} calls). "
        "1 of 1 control calls did not raise cleanly (stacktraces 0: 1 of 1)."
    )


def test_main_runs_the_phases_in_order_and_reports_after_each(tmp_path, monkeypatch, capsys):
    """main() with the GPU and the phases stood in for: build first, then the phases --only names in
    their fixed order; the report rewritten after each; the end of the output the phases, the
    probe and the targets; exit 1 when a phase failed."""
    monkeypatch.setattr(gpu_check, "OUT", tmp_path / "out")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "RESULTS_GPU.md")
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gpu_check, "venv_python", lambda: sys.executable)
    monkeypatch.setattr(gpu_check, "environment", lambda python: ["- GPU: a stand-in"])
    ran, reports = [], []

    def phase(name, outcome, rows=()):
        def run(*args):
            ran.append(name)
            if gpu_check.RESULTS.exists():
                reports.append(gpu_check.RESULTS.read_text())
            with open(gpu_check.OUT / "bench.jsonl", "a") as f:
                f.writelines(json.dumps({"kind": "row", **r}) + "\n" for r in rows)
            return outcome

        return run

    monkeypatch.setattr(gpu_check, "build", phase("build", gpu_check.SKIPPED))
    monkeypatch.setattr(gpu_check, "probe", phase("probe", gpu_check.PASSED))
    monkeypatch.setattr(
        gpu_check, "benchmarks", lambda python, selection, log: phase(selection, gpu_check.PASSED, ROWS)()
    )
    monkeypatch.setattr(gpu_check, "tests", phase("tests", gpu_check.FAILED))
    assert gpu_check.main(["--only", "tests,bench"]) == 1
    assert ran == ["build", "not baseline", "tests"]
    assert "| GPU benchmarks: ours | passed |" in reports[-1]  # written before the tests ran
    out = capsys.readouterr().out
    tail = out[out.index("| phase |") :]
    assert (
        "| CUDA and Triton tests | FAILED |" in tail
        and "| 27 | ARP forward ≤ 20 µs | fp32 | cuda | 18.0 µs | met |" in tail
    )
    assert "## Every timing" not in tail and "| arp forward | fp32 | cuda | 18.0 |" in gpu_check.RESULTS.read_text()


@pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb")
def test_gdb_gives_the_native_backtrace_of_a_crash():
    case = probe.Case("segfaults", "import ctypes\nctypes.string_at(0)", "", cuda=False, busseg=False)
    frames = probe.native_backtrace(case, "stacktraces 0").splitlines()
    assert frames[0].startswith("#0 ") and any("string_at" in f for f in frames), frames
