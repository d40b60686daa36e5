"""`make gpu-check` (tools/gpu_check.py): one line and exit 0 without a CUDA GPU; its report table."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

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


def test_benchmark_table_ratios_and_bandwidth(tmp_path, monkeypatch):
    def bench(name, group, median, **extra):
        return dict(name=name, group=group, stats=dict(median=median), extra_info=extra)

    runs = {
        "bench_copy": [bench("test_copy", "copy", 1e-3, bytes=2 * 10**9)],  # 2000 GB/s
        "bench_arp": [
            bench("test_arp[cuda]", "arp", 1e-4, bytes=10**8, peak_mib=12.0),  # 1000 GB/s
            bench("test_arp[unfold]", "arp", 8e-4),
            bench("test_arp[compiled_unfold]", "arp", 2e-4),
        ],
    }
    for name, rows in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmarks": rows}))
    monkeypatch.setattr(gpu_check, "OUT", tmp_path)  # bench_cra and bench_phnet did not run
    table = gpu_check.benchmark_table()
    assert table[2:] == [
        "| copy | test_copy | 1.000 |  | 2000 (100 %) |  |",
        "| arp | cuda | 0.100 | 8.0× unfold, 2.0× compiled_unfold | 1000 (50 %) | 12 |",
        "| arp | unfold | 0.800 |  |  |  |",
        "| arp | compiled_unfold | 0.200 |  |  |  |",
    ]


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


def test_a_phase_is_as_bad_as_its_worst_command():
    assert gpu_check.worst(gpu_check.PASSED, gpu_check.PASSED) == gpu_check.PASSED
    assert gpu_check.worst(gpu_check.PASSED, gpu_check.FAILED) == gpu_check.FAILED
    assert gpu_check.worst(gpu_check.FAILED, gpu_check.OUT_OF_TIME, gpu_check.PASSED) == gpu_check.OUT_OF_TIME


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_time_limit_is_refused_in_one_line(value):
    out = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--time-limit", value], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    last = out.stderr.splitlines()[-1]
    assert last.startswith("gpu_check.py: error:") and "--time-limit" in last and value in last
