"""tools/gpu_compile_check.py (`make gpu-compile-check`): the launch spaces cover every axis value,
the drift guards and the compile-error path fire, the occupancy and report arithmetic; the PTX and
SASS readers on real lines (global load widths, local memory, wgmma / mma.sync by input type) and
on real sm_90 compiles; local memory fails the check where issue 27 allows none. The check itself
(every kernel compiled for sm_80/sm_90) runs in `make test` as its own target."""

import ast
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
    space = check.SPACES[name]
    points = check.launch_points(space)
    for axis, values in space.axes.items():
        assert {repr(v) for v in values} <= {repr(p[axis]) for p in points}, axis
    for dtype in space.axes["dtype"]:  # base and corners in every dtype
        assert sum(p["dtype"] == dtype for p in points) >= 1 + len(space.corners)
    assert set(space.unbounded) <= set(space.axes)


def test_every_triton_module_is_checked():
    stems = {p.stem for p in (ROOT / "busseg_ops" / "triton").glob("*.py") if not p.name.startswith("_")}
    assert {m.rsplit(".", 1)[1] for m in check.TRITON_MODULES} == stems
    assert set(check.SPACES) == set(check.TRITON_MODULES)  # each with its launch space
    jobs, problems = check.triton_jobs(check.TRITON_MODULES[:1], targets=(90,), spaces={})
    assert not jobs and problems == [f"{check.TRITON_MODULES[0]}: no launch space (tools/triton_launches.py)"]


FAKE_MODULE = """
import torch
import triton
import triton.language as tl
from triton_launches import LaunchSpace


@triton.jit
def small_dot_kernel(x, out, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(x + i[:, None] * BLOCK + i[None, :])
    tl.store(out + i[:, None] * BLOCK + i[None, :], tl.dot(a, a))


@triton.jit
def forgotten_kernel(x):
    tl.store(x, 1.0)


def stand_in(dtype, n):
    x = torch.zeros(n, n, dtype=dtype)
    small_dot_kernel[(1,)](x, x, BLOCK=triton.next_power_of_2(n))  # uncapped


SPACE = LaunchSpace({"dtype": (torch.float16,), "n": (8, 64)}, stand_in)
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
        import importlib
        import gpu_compile_check as check
        space = importlib.import_module({name!r}).SPACE
        jobs, problems = check.triton_jobs([{name!r}], targets=(90,), spaces={{{name!r}: space}})
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
    assert "fake_kernels.forgotten_kernel: a kernel that its stand-in never launches" in stdout
    assert "fake_kernels.small_dot_kernel: n=256 launches a configuration that n=64 does not" in stdout
    assert "BLOCK=8" in stdout and "BLOCK=64" in stdout
    error = stdout.split("ERROR ", 1)[1]
    assert "K >= 16" in error, error


FLOAT_ARG_MODULE = """
import torch
import triton
import triton.language as tl

from triton_launches import LaunchSpace

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


def stand_in(dtype):
    x = torch.zeros(4, 128, dtype=dtype)
    promoting_kernel[(1,)](x, x, 4, 0.1, BLOCK=128)
    joining_kernel[(1,)](x, x, 4, *split(0.1), BLOCK=128)


SPACE = LaunchSpace({"dtype": (torch.float32,)}, stand_in)
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


# Real lines, cut from Triton 3.9's PTX of our kernels and of a 64×64 tl.dot for sm_90a, and from
# `cuobjdump -sass` of build/cuda-check objects and of small nvcc/Triton test kernels.
PTX = """
.version 8.7
.target sm_90a
.visible .entry dot_kernel(
	ld.param.b64 	%rd31, [dot_kernel_param_0];
	@%p9 ld.global.b32 { %r1 }, [ %rd1 + 0 ];
	@%p34 ld.global.v4.b32 { %r138, %r139, %r140, %r141 }, [ %rd32 + 0 ];
	@%p35 ld.global.v4.b32 { %r142, %r143, %r144, %r145 }, [ %rd33 + 0 ];
	ld.global.v2.b64 { %rd40, %rd41 }, [ %rd9 + 0 ];
	ld.global.v2.b32 { %r20, %r21 }, [ %rd10 + 0 ];
	@%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
	ld.shared.v4.b32 { %r50, %r51, %r52, %r53 }, [ %r40 + 0 ];
	cp.async.cg.shared.global [ %r117 + 0 ], [ %rd39 + 0 ], 0x10, %r118;
	cp.async.ca.shared.global [ %r145 + 0 ], [ %rd46 + 0 ], 0x8, %r146;
	cp.async.commit_group;
	st.local.v2.b32 [%rd60], {%r7, %r8};
	ld.local.b32 %r9, [%rd60+4];
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%r65,%r66,%r67,%r68}, %rd65, %rd66, 0, 1, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1,%r2,%r3,%r4}, %rd65, %rd66, 0, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %r274, %r275, %r276, %r277 }, { %r162, %r163, %r164, %r165 }, { %r166, %r167 }, { %r274, %r275, %r276, %r277 };
	st.global.v4.b32 [ %rd50 + 0 ], { %r1, %r2, %r3, %r4 };
"""  # noqa: E501


def test_ptx_loads_local_memory_and_tensor_cores():
    code = check.ptx_code(PTX)
    # b32, v4.b32 ×2, v2.b64, v2.b32, b16, cp.async 16 B, cp.async 8 B: 8 global loads, 4 of 128 bits
    assert (code.loads, code.wide_loads) == (8, 4)
    assert code.local == 2
    assert code.tensor == ("mma.sync bf16", "wgmma bf16", "wgmma tf32")
    narrow = check.ptx_code(
        "\tld.global.b32 { %r1 }, [ %rd1 + 0 ];\n\tmma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {};"
    )
    assert (narrow.loads, narrow.wide_loads, narrow.local, narrow.tensor) == (1, 0, 0, ("mma.sync f64",))


SASS = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

	code for sm_80
	.target	sm_80

		Function : _Z5copy4PK6float4PS_i
	.headerflags	@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;                            /* 0x00000a00ff017624 */
        /*0c20*/                   LDG.E.64.CONSTANT R18, [R18.64] ;                                  /* 0x0000000e12127981 */
        /*0c40*/                   LDG.E.CONSTANT R8, [R4.64] ;                           /* 0x0000000404087981 */
        /*0e00*/                   LDG.E.128.CONSTANT R4, [R6.64] ;                           /* 0x0000000406047981 */
        /*2350*/               @P0 LDG.E.U8 R36, [R36.64] ;                                      /* 0x0000000624247981 */
        /*05b0*/                   STL.128 [R41], R4 ;                                                /* 0x0000000429007387 */
        /*0bc0*/                   LDL.64 R16, [R12] ;                                                /* 0x000000000c107983 */
        /*0130*/                   HMMA.16816.F32.BF16 R16, R4.reuse, R12, RZ ;               /* 0x0000000c0410723c */
        /*01e0*/                   HMMA.1684.F32.TF32 R12, R8.reuse, R12, RZ ;                /* 0x0000000c080c723c */
		Function : _Z8mma_bf16PK13__nv_bfloat16S1_Pf
        /*0140*/                   HMMA.16816.F32 R12, R4, R14, RZ ;                     /* 0x0000000e040c723c */

Fatbin elf code:
================
arch = sm_90

	code for sm_90a
		Function : _Z5copy4PK6float4PS_i
        /*00a0*/                   LDG.E.U16 R18, desc[UR12][R4.64+0x800] ;                    /* 0x0008000c04127981 */
        /*0ee0*/              @!P1 LDG.E.128.CONSTANT R4, desc[UR4][R4.64] ;                           /* 0x0000000404047981 */
        /*0aa0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4].tnspB, RZ, !UPT ;   /* 0x40e00000041879f0 */
        /*0a80*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], RZ, !UPT ;   /* 0x04e00000041879f0 */
"""  # noqa: E501


def test_sass_loads_local_memory_and_tensor_cores():
    codes = check.sass_code(SASS)
    assert set(codes) == {("_Z5copy4PK6float4PS_i", 80), ("_Z8mma_bf16PK13__nv_bfloat16S1_Pf", 80),
                          ("_Z5copy4PK6float4PS_i", 90)}  # fmt: skip
    sm80 = codes[("_Z5copy4PK6float4PS_i", 80)]
    assert (sm80.loads, sm80.wide_loads, sm80.local) == (4, 1, 2)
    assert sm80.tensor == ("mma.sync bf16", "mma.sync tf32")
    assert codes[("_Z8mma_bf16PK13__nv_bfloat16S1_Pf", 80)].tensor == ("mma.sync f16",)
    sm90 = codes[("_Z5copy4PK6float4PS_i", 90)]
    assert (sm90.loads, sm90.wide_loads, sm90.local, sm90.tensor) == (2, 1, 0, ("wgmma bf16", "wgmma tf32"))


def test_local_memory_fails_the_check_in_the_ops_that_must_have_none():
    code = check.Code(loads=4, wide_loads=4, local=3)
    arp = check.Usage("cuda.adjacent_relation_propagation.k", 90, "float", regs=40, threads=128, code=code)
    stack = check.Usage("triton.greedy_proxy_sampling.k", 80, "fp32", regs=40, stack=16, threads=128)
    cra = check.Usage("cuda.cross_layer_alignment_loss.k", 90, "float", regs=40, stack=64, threads=128, code=code)
    assert check.failures([], [arp, stack, cra]) == [
        "cuda.adjacent_relation_propagation.k [float] sm_90: local memory (stack 0 B, 3 local loads/stores): "
        "none allowed in adjacent_relation_propagation's kernels",
        "triton.greedy_proxy_sampling.k [fp32] sm_80: local memory (stack 16 B, ? local loads/stores): "
        "none allowed in greedy_proxy_sampling's kernels",
    ]
    assert cra.local_memory  # reported, allowed


def test_kernel_summary_and_table_cells():
    ptx = check.ptx_code(PTX)
    usages = [
        check.Usage("triton.op.k", 80, "bf16", regs=40, threads=128, code=check.Code(2, 1, 0, ("mma.sync bf16",))),
        check.Usage("triton.op.k", 90, "bf16", regs=48, threads=128, code=ptx),
        check.Usage("triton.op.k", 90, "fp32", regs=64, threads=128, code=check.Code(4, 0, 0, ())),
    ]
    [row] = check.kernel_summary(usages)[2:]
    assert row == (
        "| triton.op.k | 64 | 32 / 64 | stack ≤ 0 B, 2 ld/st (1 of 3) | 1 of 2 / 4 of 12 "
        "| mma.sync bf16 (1), wgmma bf16 (1), wgmma tf32 (1), none (1) |"
    )
    rows = check.table(usages)[2:]
    assert rows[0].endswith("| 1 of 2 / 4 of 8 | mma.sync bf16 / mma.sync bf16, wgmma bf16, wgmma tf32 |")
    assert rows[1].endswith("| 0 of 4 | none |")


WIDE_MODULE = """
import torch
import triton
import triton.language as tl
from triton_launches import LaunchSpace


@triton.jit
def copy_kernel(x, out, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, tl.load(x + i) * 2)


@triton.jit
def dot_kernel(a, b, c):
    i = tl.arange(0, 64)
    x = tl.load(a + i[:, None] * 64 + i[None, :])
    y = tl.load(b + i[:, None] * 64 + i[None, :])
    tl.store(c + i[:, None] * 64 + i[None, :], tl.dot(x, y))


def stand_in(dtype):
    x = torch.zeros(64, 64, dtype=dtype)
    copy_kernel[(8,)](x, x, BLOCK=1024, num_warps=4)  # 8 bf16 per thread: one 128-bit load
    dot_kernel[(1,)](x, x, torch.zeros(64, 64))


SPACE = LaunchSpace({"dtype": (torch.bfloat16,)}, stand_in)
"""


def test_compiled_triton_kernels_show_their_wide_loads_and_wgmma(tmp_path):
    """The whole path on real compiles for sm_90: a bf16 copy loads 128 bits per thread, a 64×64
    bf16 tl.dot with 4 warps runs on wgmma."""
    stdout = run_check_on(
        tmp_path,
        "wide_kernels",
        WIDE_MODULE,
        """
        for job in sorted(jobs, key=lambda j: j.kernel):
            u = check.compile_job(job)
            print(job.kernel, u.error or (u.code.wide_loads, u.code.loads, u.code.tensor))
        """,
    )
    copy, dot = stdout.splitlines()
    wide, loads, tensor = ast.literal_eval(copy.removeprefix("copy_kernel "))
    assert wide == loads >= 1 and tensor == (), copy
    assert dot.endswith("('wgmma bf16',))"), dot
