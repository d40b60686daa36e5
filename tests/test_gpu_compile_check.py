"""tools/gpu_compile_check.py (`make gpu-compile-check`): the launch spaces cover every axis value,
the drift guards and the compile-error path fire, the occupancy and report arithmetic. The check
itself (every kernel compiled for sm_80/sm_90) runs in `make test` as its own target."""

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_compile_check as check  # noqa: E402


@pytest.mark.parametrize("name", check.TRITON_MODULES)
def test_launch_points_cover_every_value_of_every_axis(name):
    module = importlib.import_module(name)
    points = check.launch_points(module)
    for axis, values in module.LAUNCH_AXES.items():
        assert {repr(v) for v in values} <= {repr(p[axis]) for p in points}, axis
    corners = [{}, *getattr(module, "LAUNCH_CORNERS", ())]
    for dtype in module.LAUNCH_AXES["dtype"]:  # base and corners in every dtype
        assert sum(p["dtype"] == dtype for p in points) >= len(corners)
    assert set(getattr(module, "UNBOUNDED_AXES", ())) <= set(module.LAUNCH_AXES)


def test_every_triton_module_is_checked():
    stems = {p.stem for p in (ROOT / "busseg_ops" / "triton").glob("*.py") if not p.name.startswith("_")}
    assert {m.rsplit(".", 1)[1] for m in check.TRITON_MODULES} == stems


FAKE_MODULE = """
import torch
import triton
import triton.language as tl


@triton.jit
def small_dot_kernel(x, out, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(x + i[:, None] * BLOCK + i[None, :])
    tl.store(out + i[:, None] * BLOCK + i[None, :], tl.dot(a, a))


@triton.jit
def forgotten_kernel(x):
    tl.store(x, 1.0)


LAUNCH_AXES = {"dtype": (torch.float16,), "n": (8, 64)}


def launch_stand_in(dtype, n):
    x = torch.zeros(n, n, dtype=dtype)
    small_dot_kernel[(1,)](x, x, BLOCK=triton.next_power_of_2(n))  # uncapped
"""


def run_check_on(tmp_path, name: str, source: str, body: str) -> str:
    """Write the kernel module ``name`` and run ``body`` in a fresh process with the checker imported
    as ``check`` and ``jobs, problems`` of that module for sm_90 (no interpreter); its stdout."""
    (tmp_path / f"{name}.py").write_text(source)
    script = textwrap.dedent(f"""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["TRITON_CACHE_DIR"] = {str(tmp_path / "cache")!r}
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT / "tools")!r}]
        import gpu_compile_check as check
        jobs, problems = check.triton_jobs([{name!r}], targets=(90,))
    """) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_drift_guards_and_compile_errors(tmp_path):
    """A kernel no stand-in launches and a block size that grows past the axis are reported; tl.dot
    on 8 x 8 float16 blocks, which the interpreter runs, fails to compile for sm_90 and is reported."""
    stdout = run_check_on(
        tmp_path,
        "fake_kernels",
        FAKE_MODULE,
        """
        print("\\n".join(problems))
        small = [j for j in jobs if "BLOCK=8" in j.config]
        print("CONFIGS", sorted(j.config for j in jobs))
        print("ERROR", check.compile_job(small[0]).error.splitlines()[-1])
        """,
    )
    assert "fake_kernels.forgotten_kernel: a kernel that launch_stand_in never launches" in stdout
    assert "fake_kernels.small_dot_kernel: n=256 launches a configuration that n=64 does not" in stdout
    assert "BLOCK=8" in stdout and "BLOCK=64" in stdout
    error = stdout.split("ERROR ", 1)[1]
    assert "K >= 16" in error, error


FLOAT_ARG_MODULE = """
import torch
import triton
import triton.language as tl

from busseg_ops.triton._float_args import join, split


@triton.jit
def promoting_kernel(x, out, n, scale, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(n):
        acc += tl.load(x + i * BLOCK + tl.arange(0, BLOCK)) * scale
    tl.store(out + tl.arange(0, BLOCK), acc)


@triton.jit
def joining_kernel(x, out, n, scale_hi, scale_lo, BLOCK: tl.constexpr):
    scale = join(scale_hi, scale_lo, tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(n):
        acc += tl.load(x + i * BLOCK + tl.arange(0, BLOCK)) * scale
    tl.store(out + tl.arange(0, BLOCK), acc)


LAUNCH_AXES = {"dtype": (torch.float32,)}


def launch_stand_in(dtype):
    x = torch.zeros(4, 128, dtype=dtype)
    promoting_kernel[(1,)](x, x, 4, 0.1, BLOCK=128)
    joining_kernel[(1,)](x, x, 4, *split(0.1), BLOCK=128)
"""


def test_float_arguments_are_compiled_as_torch_compile_types_them(tmp_path):
    """Each launch with float arguments is compiled for sm_90 again with them float64 (Inductor on a
    GPU): a kernel whose float32 loop accumulator they promote fails there, one that joins them
    into its compute dtype (busseg_ops/triton/_float_args.py) compiles."""
    stdout = run_check_on(
        tmp_path,
        "float_kernels",
        FLOAT_ARG_MODULE,
        """
        for job in jobs:
            error = check.compile_job(job).error
            print(job.kernel, job.config.endswith("floats fp64"), "ERROR " + error.splitlines()[-1] if error else "ok")
        """,
    )
    results = sorted(stdout.splitlines())
    assert results[:3] == ["joining_kernel False ok", "joining_kernel True ok", "promoting_kernel False ok"], results
    assert results[3].startswith("promoting_kernel True ERROR") and "fp64" in results[3], results


def test_a_float_split_in_two_halves_keeps_48_bits():
    from busseg_ops.triton._float_args import split

    for x in (0.1, 3**-0.5, 1 / 0.07, -2.5e-10, 0.0, 1e30):
        hi, lo = split(x)
        assert np.float32(hi) == hi and np.float32(lo) == lo
        assert abs((hi + lo) - x) <= abs(x) * 2.0**-46
    assert split(float("inf")) == (float("inf"), 0.0)
    # a symbolic float (dynamic shapes) passes whole, not specialised to a value
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    symbolic = ShapeEnv().create_unbacked_symfloat()
    hi, lo = split(symbolic)
    assert hi is symbolic and lo == 0.0


def usage(regs, threads, shared=0, target=90):
    return check.Usage("k", target, "", regs=regs, threads=threads, shared=shared)


def test_occupancy_limits():
    # 32 registers, 4 warps: the 2048-thread limit (16 blocks, all 64 warps)
    assert check.occupancy(usage(32, 128)) == (16, 64, "threads")
    # 255 registers round to 256 per thread = 8192 per warp: 8 warps per SM
    assert check.occupancy(usage(255, 256)) == (1, 8, "registers")
    assert check.occupancy(usage(168, 128)) == (3, 12, "registers")  # 5376 per warp: 12 warps
    # 40 KiB of shared memory (+1 KiB reserved per block): 5 blocks on sm_90, 4 on sm_80
    assert check.occupancy(usage(32, 128, 40 * 1024)) == (5, 20, "shared memory")
    assert check.occupancy(usage(32, 128, 40 * 1024, target=80)) == (4, 16, "shared memory")
    assert check.occupancy(usage(32, 128, 200 * 1024, target=80))[0] == 0  # over the per-block limit


def test_spills_compile_errors_and_unbounded_cuda_kernels_fail_the_check():
    clean = check.Usage("triton.op.k", 90, "fp32", regs=40, threads=128)
    spilling = check.Usage("cuda.op.k", 80, "double", regs=255, spill_stores=8, threads=256)
    broken = check.Usage("triton.op.k", 80, "fp16", error="CompilationError: K >= 16")
    unbounded = check.Usage("cuda.op.k", 90, "float", regs=32)
    assert check.failures([], [clean]) == []
    assert check.failures(["drift"], [clean, spilling, broken, unbounded]) == [
        "drift",
        "triton.op.k [fp16] sm_80: CompilationError: K >= 16",
        "cuda.op.k [float] sm_90: no __launch_bounds__(threads, 1)",
        "cuda.op.k [double] sm_80: spills 8 B stored / 0 B loaded",
    ]


def test_ptxas_report_parsing(tmp_path):
    log = tmp_path / "some_op.ptxas.log"
    log.write_text(
        "ptxas info    : Compiling entry function '_Z3fooIfEvPT_' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z3fooIfEvPT_\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 72 registers, used 1 barriers, 528 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function '_Z3fooIfEvPT_' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooIfEvPT_\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 528 bytes smem\n"
    )
    sm80, sm90 = check.cuda_usage(tmp_path)
    assert (sm80.kernel, sm80.config, sm80.target) == ("cuda.some_op.foo", "float", 80)
    assert (sm80.regs, sm80.stack, sm80.spill_stores, sm80.spill_loads, sm80.shared) == (72, 8, 4, 12, 528)
    assert sm80.spills and not sm90.spills and sm90.regs == 40


def test_results_table_is_replaced_between_markers(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n")
    check.write_results("first table", results)
    check.write_results("second table", results)
    text = results.read_text()
    assert text.startswith("# Results\n\nintro\n") and text.count(check.BEGIN) == 1
    assert "second table" in text and "first table" not in text
