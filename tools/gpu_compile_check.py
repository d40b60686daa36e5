"""Compile every Triton kernel of busseg_ops for sm_80 and sm_90 with no GPU, the way its
launchers would launch it, and print the resource usage of each (and of the CUDA kernels that
`make cuda-check` compiled). Fails on any compile error, on any register spill, and on a CUDA
kernel that does not declare its block size (``__launch_bounds__``, which the occupancy needs).

Where the configurations come from: each module ``busseg_ops/triton/*.py`` declares the problem
axes that decide what its launchers launch (``LAUNCH_AXES``: dtypes, sizes that pick block sizes,
flags) and a ``launch_stand_in(**point)`` that calls its launchers on stand-in inputs of one
problem. The check runs those calls with every kernel launch intercepted (nothing runs), and
derives each launch's signature, specialisation and constexprs with Triton's own binder for the
GPU target, exactly as ``JITFunction.run`` would on a GPU. So block sizes and dtypes always come
from the launchers' own code, never from a copy here.

Which problems: in every dtype the base problem (the first value of each axis) and the module's
``LAUNCH_CORNERS`` (the largest blocks: the register worst case); then, in the base dtype, a
diagonal sweep: point i takes value i+1 of every axis (cycling), the first point the smallest
blocks. So every value of every axis is compiled at least once, and the register worst case in
every dtype; the full cross product of all axes would be thousands of compiles, far beyond what
`make test` can spend. Launches that compile to the same thing (kernel, target, signature,
specialisation, constexprs, options) are compiled once. Triton also specialises integer arguments
on their value (1, multiples of 16): the stand-ins' sizes include both kinds, not every mix.
Guards against drift: every @triton.jit kernel of a module must be launched by some stand-in, and
the size axes must be saturated -- a problem four times larger than an axis's largest value may
not launch anything new (an uncapped block size fails here). Axes listed in ``UNBOUNDED_AXES``
(each value its own compile, e.g. the kernel size) are checked at their listed values only.

torch.compile launches the same kernels with other argument types: on a GPU, Inductor types a
Python float argument float64 where Triton's JIT types it float32. So each launch of the base
problem and the corners (every dtype) with float arguments is compiled for sm_90 a second time with
them float64 (the configuration reads "floats fp64"); a kernel that lets such an argument promote
its float32 arithmetic fails there (busseg_ops/triton/_float_args.py says how ours avoid it).

    python tools/gpu_compile_check.py                 # compile, print the table; exit 1 on failure
    python tools/gpu_compile_check.py --write-results # also rewrite the table in benchmarks/RESULTS.md

The compiles run in ``--jobs`` processes (default: MAX_JOBS). Triton's cache goes to
build/triton-gpu-check (re-runs are fast).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib
import io
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
# The one list of kernel sources: every Triton module of the package, every CUDA object that
# `make cuda-check` built (it compiles every csrc/<op>/cuda.cu there, with -Xptxas -v logs beside).
TRITON_MODULES = sorted(
    f"busseg_ops.triton.{Path(p).stem}" for p in glob.glob(str(ROOT / "busseg_ops/triton/[!_]*.py"))
)
CUDA_CHECK_DIR = ROOT / "build" / "cuda-check"
TARGETS = (80, 90)
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- gpu-resources:begin -->", "<!-- gpu-resources:end -->"
SATURATION_FACTOR = 4

# Per-SM limits used for the occupancy column (CUDA occupancy calculator rules): registers are
# allocated per warp in units of 256, each block also takes 1 KiB of shared memory reserved by
# the runtime.
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, warps=64, blocks=32, smem=164 * 1024, smem_block=163 * 1024),  # A100
    90: dict(regs=65536, threads=2048, warps=64, blocks=32, smem=228 * 1024, smem_block=227 * 1024),  # H100/H200
}
REG_UNIT = 256
SMEM_RESERVED = 1024


@dataclass
class Usage:
    """Resources of one compiled kernel for one target."""

    kernel: str
    target: int
    config: str
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    threads: int | None = None  # per block; None when the binary does not say
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def occupancy(u: Usage) -> tuple[int, int, str]:
    """(resident blocks per SM, resident warps per SM, what limits them) on the target's SM."""
    sm = SM_LIMITS[u.target]
    warps_per_block = u.threads // 32
    reg_per_warp = -(-max(u.regs, 1) * 32 // REG_UNIT) * REG_UNIT
    limits = {
        "registers": (sm["regs"] // reg_per_warp) // warps_per_block,
        "threads": sm["threads"] // u.threads,
        "blocks": sm["blocks"],
        "shared memory": sm["smem"] // (u.shared + SMEM_RESERVED),
    }
    if u.shared > sm["smem_block"]:
        limits["shared memory"] = 0
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "threads"))
    return blocks, blocks * warps_per_block, limiter


# ---- Triton: which launches --------------------------------------------------------------------


def launch_points(module) -> list[dict]:
    """Problems to run through the stand-in: the base and the corners in every dtype, then a
    diagonal sweep in the base dtype (point i takes value i+1 of every axis, cycling), so every value
    of every axis is compiled at least once."""
    axes = module.LAUNCH_AXES
    base = {name: values[0] for name, values in axes.items()}
    points = []
    for dtype in axes["dtype"]:
        for corner in ({}, *getattr(module, "LAUNCH_CORNERS", ())):
            points.append({**base, **corner, "dtype": dtype})
    sweep = {name: values[1:] for name, values in axes.items() if name != "dtype" and len(values) > 1}
    for i in range(max(map(len, sweep.values()), default=0)):
        points.append({**base, **{name: values[i % len(values)] for name, values in sweep.items()}})
    return points


def size_axes(module) -> list[str]:
    """Axes of integer sizes whose block sizes must saturate (all but UNBOUNDED_AXES)."""
    unbounded = set(getattr(module, "UNBOUNDED_AXES", ()))
    return [
        name
        for name, values in module.LAUNCH_AXES.items()
        if name not in unbounded and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ]


@dataclass
class Launch:
    module: str
    kernel: str  # the @triton.jit function's name in its module
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def captured_launches():
    """Every kernel launch made inside the block is recorded instead of run (works for compiled
    and for interpreted kernels)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        fn = getattr(self, "fn", self)
        launches.append(Launch(fn.__module__, fn.__name__, args, kwargs))

    with mock.patch.object(JITFunction, "run", record), mock.patch.object(InterpretedFunction, "run", record):
        yield launches


def _specialise(launch: Launch, target: int):
    """What JITFunction.run would compile for this launch on `target`: (signature, constexprs,
    attrs, options) from Triton's own binder and argument packing."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    backend = make_backend(GPUTarget("cuda", target, 32))
    kwargs = dict(launch.kwargs, debug=kernel.debug, instrumentation_mode="")
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9's JIT passes it; 3.6's has none
        kwargs["fpsan_homomorphic_casts"] = False
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _describe(kernel, signature: dict, constexprs: dict, options: dict) -> str:
    """Short label: element types of the pointers, the constexprs the launcher chose, warps."""
    pointers = sorted({t[1:] for t in signature.values() if t.startswith("*") and t != "*i64"})
    names = kernel.arg_names
    chosen = []
    for (i,), v in sorted(constexprs.items()):
        if signature[names[i]] == "constexpr" and kernel.params[i].is_constexpr:
            chosen.append(f"{names[i]}={getattr(v, 'name', v)}")
        else:
            chosen.append(f"{names[i]}≡{v}")  # an argument Triton specialised (== 1)
    launch = [f"warps={options['num_warps']}"] + ([f"maxnreg={options['maxnreg']}"] if options.get("maxnreg") else [])
    return " ".join(["/".join(pointers)] + chosen + launch)


def _entry_kernels(module) -> list[str]:
    """The module's @triton.jit functions that no other one calls: the kernels."""
    from triton.runtime.jit import JITFunction

    jitted = {k: v for k, v in vars(module).items() if isinstance(v, JITFunction) and v.__module__ == module.__name__}
    called = {k for k in jitted for v in jitted.values() if v is not jitted[k] and re.search(rf"\b{k}\(", v.src)}
    return [k for k in jitted if k not in called]


@dataclass
class Job:
    module: str
    kernel: str
    target: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str


def _signature_key(launch: Launch, target: int) -> tuple:
    sig, const, _, options = _specialise(launch, target)
    return launch.kernel, repr(sig), repr(const), options["num_warps"]


def triton_jobs(modules=TRITON_MODULES, targets=TARGETS) -> tuple[list[Job], list[str]]:
    """The compile jobs (deduplicated) and the drift errors: modules without a launch space,
    kernels no stand-in launches, size axes whose launches still change past their largest value."""
    jobs: dict[tuple, Job] = {}
    problems = []

    def add(name, launch, target, sig, const, attrs, options, note=""):
        key = (name, launch.kernel, target, repr(sig), repr(const), repr(attrs), repr(options))
        if key not in jobs:
            label = _describe(getattr(importlib.import_module(name), launch.kernel), sig, const, options) + note
            jobs[key] = Job(name, launch.kernel, target, sig, const, attrs, options, label)

    for name in modules:
        module = importlib.import_module(name)
        if not hasattr(module, "LAUNCH_AXES"):
            problems.append(f"{name}: no LAUNCH_AXES / launch_stand_in (see tools/gpu_compile_check.py)")
            continue

        def launches(point, module=module):
            with captured_launches() as found:
                module.launch_stand_in(**point)
            return found

        seen = set()
        points = launch_points(module)
        typed = points[: len(module.LAUNCH_AXES["dtype"]) * (1 + len(getattr(module, "LAUNCH_CORNERS", ())))]
        for point in points:
            for launch in launches(point):
                seen.add(launch.kernel)
                for target in targets:
                    add(name, launch, target, *_specialise(launch, target))
                if point in typed and 90 in targets:
                    sig, const, attrs, options = _specialise(launch, 90)
                    if "fp32" in sig.values():  # as Inductor passes the floats on a GPU
                        sig = {k: "fp64" if t == "fp32" else t for k, t in sig.items()}
                        add(name, launch, 90, sig, const, attrs, options, " floats fp64")
        for kernel in _entry_kernels(module):
            if kernel not in seen:
                problems.append(f"{name}.{kernel}: a kernel that launch_stand_in never launches")
        base = {axis: values[0] for axis, values in module.LAUNCH_AXES.items()}
        for start in (base, *({**base, **c} for c in getattr(module, "LAUNCH_CORNERS", ()))):
            for axis in size_axes(module):
                largest = max(module.LAUNCH_AXES[axis])
                at_max = {_signature_key(x, targets[0]) for x in launches({**start, axis: largest})}
                beyond = {_signature_key(x, targets[0]) for x in launches({**start, axis: SATURATION_FACTOR * largest})}
                for kernel, *_ in sorted(beyond - at_max):
                    problems.append(
                        f"{name}.{kernel}: {axis}={SATURATION_FACTOR * largest} launches a configuration that "
                        f"{axis}={largest} does not (an uncapped block size? cap it, or extend LAUNCH_AXES)"
                    )
    return list(jobs.values()), problems


# ---- Triton: compiling -------------------------------------------------------------------------

_PTXAS_HOOK_KEY = "busseg-keep-ptxas-log"


def _keep_ptxas_log(backend=None, stages=None, options=None, language=None, capability=None):
    """Triton stages hook: ptxas's -v report goes into the kernel's metadata, so a kernel served
    from the cache still has it (Triton itself only prints it, under TRITON_DUMP_PTXAS_LOG)."""
    if stages is None:
        return _PTXAS_HOOK_KEY, _PTXAS_HOOK_KEY
    from triton import knobs

    make_cubin = stages["cubin"]

    def cubin(src, metadata):
        log = io.StringIO()
        with contextlib.redirect_stdout(log), knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            binary = make_cubin(src, metadata)
        metadata["ptxas_log"] = log.getvalue()
        return binary

    stages["cubin"] = cubin


def _parse_ptxas(log: str, u: Usage) -> None:
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        u.stack, u.spill_stores, u.spill_loads = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", log)
    if m:
        u.regs = int(m.group(1))
    m = re.search(r"(\d+) bytes smem", log)
    if m:
        u.shared = int(m.group(1))


def compile_job(job: Job) -> Usage:
    """Compile one launch for its target (run in a worker process)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.runtime.add_stages_inspection_hook = _keep_ptxas_log
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    u = Usage(f"triton.{job.module.rsplit('.', 1)[-1]}.{job.kernel}", job.target, job.config)
    try:
        compiled = triton.compile(
            ASTSource(kernel, job.signature, job.constexprs, job.attrs),
            target=GPUTarget("cuda", job.target, 32),
            options=job.options,
        )
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding
        u.error = f"{type(e).__name__}: {e}".strip()
        return u
    _parse_ptxas(getattr(compiled.metadata, "ptxas_log", ""), u)
    u.shared = compiled.metadata.shared  # Triton's shared memory is all its own (allocated at launch)
    u.threads = compiled.metadata.num_warps * 32
    return u


# ---- CUDA: what `make cuda-check` compiled ---------------------------------------------------------


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _split_kernel_name(demangled: str) -> tuple[str, str]:
    """'void ns::(anonymous namespace)::f<float, true>(args)' -> ('f', 'float, true')."""
    head = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0].removeprefix("void ")
    if "<" in head:
        name, _, tmpl = head.partition("<")
        tmpl = tmpl[:-1]
    else:
        name, tmpl = head, ""
    return name.rsplit("::", 1)[-1], tmpl.replace("__nv_bfloat16", "bf16").replace("__half", "half")


def _max_threads(obj: Path) -> dict[tuple[str, int], int]:
    """{(mangled kernel, arch): threads} from __launch_bounds__ (EIATTR_MAX_THREADS in the ELF)."""
    from triton import knobs

    text = subprocess.run([knobs.nvidia.cuobjdump.path, "-elf", str(obj)], capture_output=True, text=True).stdout
    found, arch, section, pending = {}, 0, None, False
    for line in text.splitlines():
        if line.startswith("arch = sm_"):
            arch = int(line.removeprefix("arch = sm_"))
        elif line.startswith(".nv.info."):
            section = line.removeprefix(".nv.info.").split()[0]
        elif "EIATTR_MAX_THREADS" in line:
            pending = True
        elif pending and line.strip().startswith("Value:"):
            found[(section, arch)] = int(line.split()[1], 16)
            pending = False
    return found


def cuda_usage(check_dir: Path = CUDA_CHECK_DIR) -> list[Usage]:
    """Resource usage of every CUDA kernel from the ptxas -v logs that `make cuda-check` keeps."""
    entries = []  # (source, usage)
    for log in sorted(check_dir.glob("*.ptxas.log")):
        source = log.name.removesuffix(".ptxas.log")
        obj = log.with_name(source + ".o")
        threads = _max_threads(obj) if obj.exists() else {}
        current = None
        for line in log.read_text().splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)a?'", line)
            if m:
                name, target = m.group(1), int(m.group(2))
                current = Usage(name, target, "", threads=threads.get((name, target)))
                entries.append((source, current))
            elif current is not None and ("bytes stack frame" in line or "Used " in line):
                _parse_ptxas(line, current)
    names = _demangle(sorted({u.kernel for _, u in entries}))
    for source, u in entries:
        name, u.config = _split_kernel_name(names[u.kernel])
        u.kernel = f"cuda.{source}.{name}"
    return [u for _, u in entries]


# ---- report ------------------------------------------------------------------------------------


def _pair(values) -> str:
    values = list(values)
    return str(values[0]) if len(set(values)) == 1 else " / ".join(map(str, values))


def _occupancy_cell(u: Usage) -> str:
    if u.threads is None:
        return "?"
    blocks, warps, limiter = occupancy(u)
    return f"{blocks}×{u.threads} ({100 * warps // SM_LIMITS[u.target]['warps']} %, {limiter})"


def table(usages: list[Usage]) -> list[str]:
    """Markdown rows, one per kernel and configuration, each cell 'sm_80 / sm_90' where they differ."""
    rows = {}
    for u in usages:
        rows.setdefault((u.kernel, u.config), {})[u.target] = u
    lines = [
        "| kernel | configuration | registers / thread | spill stores / loads (B) | stack (B) "
        "| shared memory (B) | blocks × threads per SM (occupancy, limit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kernel, config), per_target in rows.items():
        us = [per_target[t] for t in sorted(per_target)]
        if any(u.error for u in us):
            lines.append(f"| {kernel} | {config} | compile error | | | | |")
            continue
        lines.append(
            f"| {kernel} | {config} | {_pair(u.regs for u in us)} "
            f"| {_pair(f'{u.spill_stores} / {u.spill_loads}' for u in us)} | {_pair(u.stack for u in us)} "
            f"| {_pair(u.shared for u in us)} | {_pair(_occupancy_cell(u) for u in us)} |"
        )
    return lines


def toolchain() -> str:
    import torch
    import triton
    from triton import knobs

    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            return [line for line in out.splitlines() if line.strip()][-1]
        except (OSError, subprocess.CalledProcessError, IndexError):
            return "not found"

    return (
        f"Triton {triton.__version__} (its ptxas for sm_80: {first_line([knobs.nvidia.ptxas.path, '--version'])}; "
        f"for sm_90: {first_line([knobs.nvidia.ptxas_blackwell.path, '--version'])}), "
        f"nvcc: {first_line(['nvcc', '--version'])}, PyTorch {torch.__version__}"
    )


def results_text(triton_usage: list[Usage], cuda: list[Usage], timing: str) -> str:
    """The RESULTS.md section between the markers."""
    all_usage = triton_usage + cuda
    spilling = sorted({f"{u.kernel} [{u.config}] sm_{u.target}" for u in all_usage if u.spills})
    stacks = sorted({u.kernel for u in cuda if u.stack})
    per_kernel = {}
    for u in all_usage:
        if u.threads and not u.error:
            warps = occupancy(u)[1]
            low = per_kernel.setdefault(u.kernel, [u.regs, warps])
            low[0], low[1] = max(low[0], u.regs), min(low[1], warps)
    sm80, sm90 = SM_LIMITS[80], SM_LIMITS[90]
    lines = [
        f"Generated {datetime.date.today().isoformat()} by `make gpu-resources` (`tools/gpu_compile_check.py "
        f"--write-results`; `make gpu-compile-check`, part of `make test`, prints the same table), on a machine "
        f"without a GPU: {toolchain()}. {timing}.",
        "",
        "Every Triton kernel is compiled as its launcher would launch it: the configurations come from each "
        "module's `LAUNCH_AXES` run through the launchers themselves (base and largest blocks in every dtype, "
        "then every other value of every axis once; see the tool's docstring). CUDA kernels: every template "
        "instance `make cuda-check` compiles (nvcc `-Xptxas -v`), the block size from `__launch_bounds__`.",
        "",
        "Occupancy: resident blocks × threads per SM and the share of the SM's 64 warp slots, with what limits "
        "it. Assumptions (CUDA occupancy calculator rules): "
        f"sm_90 on an H100/H200-class SM: {sm90['regs'] // 1024}K 32-bit registers, {sm90['threads']} threads, "
        f"{sm90['blocks']} blocks, {sm90['smem'] // 1024} KB shared memory "
        f"({sm90['smem_block'] // 1024} KB per block); "
        f"sm_80 on an A100 SM: the same but {sm80['smem'] // 1024} KB ({sm80['smem_block'] // 1024} KB per block); "
        f"registers allocated per warp in units of {REG_UNIT}; {SMEM_RESERVED} B of shared memory reserved per block "
        "by the runtime. Shared memory is Triton's own (fixed per configuration) or the CUDA kernel's static "
        "shared memory; the CUDA ARP forward kernel (8 × k² accumulators) and greedy sampling kernel (a "
        "feature row) also take dynamic shared memory at launch, not counted. Cells read `sm_80 / sm_90` "
        "where the two differ.",
        "",
        f"Spills: {'none' if not spilling else ', '.join(spilling)}."
        + (
            f" Stack frames without spills ({', '.join(stacks)}): per-thread arrays indexed at run time "
            "(the per-layer log-sum-exps of the CRA row kernels), kept in local memory by design."
            if stacks
            else ""
        ),
        "",
        "| kernel | most registers / thread | lowest occupancy (warps / SM) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {regs} | {warps} / 64 |" for k, (regs, warps) in sorted(per_kernel.items())]
    lines += ["", "Triton kernels (one row per launch configuration):", ""] + table(triton_usage)
    lines += ["", "CUDA kernels (one row per template instance):", ""] + table(cuda)
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace the text between the markers in RESULTS.md (appended with a heading if absent)."""
    old = path.read_text()
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n## GPU resource usage (issue 17)\n\n" + block + "\n"
    path.write_text(new)


def failures(problems: list[str], usages: list[Usage]) -> list[str]:
    """What fails the check: the drift problems, every compile error, every register spill, a CUDA
    kernel without __launch_bounds__ (its block size, which the occupancy needs, is unknown)."""
    return (
        list(problems)
        + [f"{u.kernel} [{u.config}] sm_{u.target}: {u.error}" for u in usages if u.error]
        + [
            f"{u.kernel} [{u.config}] sm_{u.target}: no __launch_bounds__(threads, 1)"
            for u in usages
            if u.threads is None and not u.error
        ]
        + [
            f"{u.kernel} [{u.config}] sm_{u.target}: spills {u.spill_stores} B stored / {u.spill_loads} B loaded"
            for u in usages
            if u.spills
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    parser.add_argument("--write-results", action="store_true", help="rewrite the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cold = not Path(os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")).expanduser().exists()

    jobs, problems = triton_jobs()
    print(
        f"gpu-compile-check: {len(jobs)} Triton compiles (each launch for sm_80 and sm_90, and for sm_90 with "
        "float arguments typed float64 as torch.compile passes them), "
        f"{args.jobs} processes",
        flush=True,
    )
    # spawn: each worker imports Triton afresh (no forked torch / OpenMP state)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = pool.map(compile_job, jobs)
        triton_usage = list(
            tqdm(compiled, total=len(jobs), desc="gpu-compile-check", unit="kernel", file=sys.stdout, mininterval=5)
        )
    cuda = cuda_usage()
    if not cuda:
        print(f"gpu-compile-check: no ptxas logs in {CUDA_CHECK_DIR} (needs nvcc): CUDA kernels not listed")

    lines = table(triton_usage) + table(cuda)[2:]
    print("\n".join(lines))
    failed = failures(problems, triton_usage + cuda)
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    timing = (
        f"{len(jobs)} Triton compiles in {time.perf_counter() - start:.0f} s ({cpu:.0f} s of CPU) with a "
        f"{'cold' if cold else 'warm'} Triton cache, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"gpu-compile-check: {timing}; {len(failed)} failures")
    if args.write_results:
        write_results(results_text(triton_usage, cuda, timing))
    for f in failed:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compilable JIT functions
    os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton-gpu-check"))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    sys.exit(main())
