"""Compile every Triton kernel of busseg_ops for sm_80 and sm_90 with no GPU, the way its launchers
would launch it (the launch spaces of tools/triton_launches.py, each launch intercepted and bound by
Triton's own binder), and print each kernel's resources, with those of the CUDA kernels that
`make cuda-check` compiled. Fails on a compile error, a register spill, local memory in the kernels
of NO_LOCAL_MEMORY_OPS, a CUDA kernel without ``__launch_bounds__``, a kernel no stand-in launches
and a size axis whose launches still change past its largest value. docs/kernels.md says which
problems are compiled and why.

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
from triton_launches import SPACES, LaunchSpace

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


#: ops whose kernels must use no local memory (issue 27: the memory-bound kernels at the copy's rate)
NO_LOCAL_MEMORY_OPS = (
    "adjacent_relation_propagation",
    "greedy_proxy_sampling",
    "patch_entropy_hardness",
    "adaptive_patch_cutmix",
)
WIDE_BITS = 128  # a vectorised global load moves 16 bytes per thread


@dataclass
class Code:
    """Static counts of one kernel's instructions on one target: global loads (asynchronous copies
    into shared memory included) and how many of them move WIDE_BITS or more per thread (a bulk
    tensor copy counts as wide), local-memory loads and stores, and the tensor-core instructions by
    input type ('wgmma bf16', 'mma.sync tf32'; SASS's HGMMA is wgmma, its HMMA/DMMA mma.sync)."""

    loads: int = 0
    wide_loads: int = 0
    local: int = 0
    tensor: tuple[str, ...] = ()

    def load(self, bits: int) -> None:
        self.loads += 1
        self.wide_loads += bits >= WIDE_BITS


_PTX_TYPE = re.compile(r"[bfsu](8|16|32|64)")
_PTX_COPY_SIZE = re.compile(r"\],\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]")


def ptx_code(ptx: str) -> Code:
    """What a kernel's PTX (Triton's) does: ``ld.global[.v2|.v4].<type>`` widths, ``cp.async``
    copy sizes, ``cp.async.bulk`` loads, ``ld/st.local``, ``wgmma.mma_async`` and ``mma.sync``."""
    code, tensor = Code(), set()
    for line in ptx.splitlines():
        words = line.split()
        if words and words[0].startswith("@"):  # a predicate
            words = words[1:]
        if not words:
            continue
        parts = words[0].rstrip(";").split(".")
        op = ".".join(parts)
        if op.startswith("ld.global"):
            vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
            bits = next((int(m.group(1)) for p in parts if (m := _PTX_TYPE.fullmatch(p))), 32)
            code.load(vector * bits)
        elif op.startswith("cp.async.bulk"):
            spaces = [p for p in parts if p.startswith(("shared", "global"))]
            if spaces and spaces[0].startswith("shared"):  # global -> shared: a load
                code.load(WIDE_BITS)
        elif op.startswith("cp.async.") and "global" in parts:
            size = _PTX_COPY_SIZE.search(line)
            code.load(8 * int(size.group(1), 0) if size else 0)
        elif op.startswith(("ld.local", "st.local")):
            code.local += 1
        elif op.startswith("wgmma.mma_async"):
            tensor.add(f"wgmma {parts[-2]}")  # ....m64n64k16.f32.bf16.bf16: D, A, B types
        elif op.startswith("mma.sync"):
            tensor.add(f"mma.sync {parts[-3]}")  # ....m16n8k16.row.col.f32.bf16.bf16.f32: D, A, B, C
    code.tensor = tuple(sorted(tensor))
    return code


_SASS_OP = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Za-z0-9_.]*)")
_SASS_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, **{str(b): b for b in (8, 16, 32, 64, 128, 256)}}


def sass_code(sass: str) -> dict[tuple[str, int], Code]:
    """{(mangled kernel, sm): Code} from ``cuobjdump -sass``: LDG/LDGSTS widths (LDG.E.128, ...;
    32 bits where none is written), UTMALDG bulk copies, LDL/STL, HGMMA (wgmma) and HMMA/DMMA
    (mma.sync), the input type from the suffix (HMMA.16816.F32.BF16: bf16; none: f16)."""
    codes: dict[tuple[str, int], Code] = {}
    tensors: dict[tuple[str, int], set] = {}
    arch, key = 0, None
    for line in sass.splitlines():
        text = line.strip()
        if text.startswith("code for sm_"):
            arch = int(re.match(r"code for sm_(\d+)", text).group(1))
        elif text.startswith("Function :"):
            key = (text.split(":", 1)[1].strip(), arch)
            codes[key], tensors[key] = Code(), set()
        elif key is not None and (m := _SASS_OP.match(text)):
            parts = m.group(1).split(".")
            code = codes[key]
            if parts[0] in ("LDG", "LDGSTS"):
                code.load(next((_SASS_BITS[p] for p in reversed(parts[1:]) if p in _SASS_BITS), 32))
            elif parts[0] == "UTMALDG":
                code.load(WIDE_BITS)
            elif parts[0] in ("LDL", "STL"):
                code.local += 1
            elif parts[0] in ("HGMMA", "HMMA", "DMMA"):
                kind = "wgmma" if parts[0] == "HGMMA" else "mma.sync"
                dtype = "f64" if parts[0] == "DMMA" else parts[3].lower() if len(parts) > 3 else "f16"
                tensors[key].add(f"{kind} {dtype}")
    for key, found in tensors.items():
        codes[key].tensor = tuple(sorted(found))
    return codes


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
    code: Code | None = None  # what its instructions show (PTX for Triton, SASS for CUDA)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def local_memory(self) -> bool:
        """A stack frame (ptxas) or local loads and stores in the code: per-thread memory in DRAM."""
        return self.stack > 0 or (self.code is not None and self.code.local > 0)

    @property
    def op(self) -> str:
        return self.kernel.split(".")[1]  # "cuda.<op>.<kernel>", "triton.<op>.<kernel>"


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


def launch_points(space: LaunchSpace) -> list[dict]:
    """Problems to run through the stand-in: the base and the corners in every dtype, then a
    diagonal sweep in the base dtype (point i takes value i+1 of every axis, cycling), so every value
    of every axis is compiled at least once."""
    axes = space.axes
    base = {name: values[0] for name, values in axes.items()}
    points = []
    for dtype in axes["dtype"]:
        for corner in ({}, *space.corners):
            points.append({**base, **corner, "dtype": dtype})
    sweep = {name: values[1:] for name, values in axes.items() if name != "dtype" and len(values) > 1}
    for i in range(max(map(len, sweep.values()), default=0)):
        points.append({**base, **{name: values[i % len(values)] for name, values in sweep.items()}})
    return points


def size_axes(space: LaunchSpace) -> list[str]:
    """Axes of integer sizes whose block sizes must saturate (all but the unbounded ones)."""
    return [
        name
        for name, values in space.axes.items()
        if name not in space.unbounded and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
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


def triton_jobs(modules=TRITON_MODULES, targets=TARGETS, spaces=SPACES) -> tuple[list[Job], list[str]]:
    """The compile jobs (deduplicated) and the drift errors: modules without a launch space in
    ``spaces``, kernels no stand-in launches, size axes whose launches still change past their
    largest value."""
    jobs: dict[tuple, Job] = {}
    problems = []

    def add(name, launch, target, sig, const, attrs, options, note=""):
        key = (name, launch.kernel, target, repr(sig), repr(const), repr(attrs), repr(options))
        if key not in jobs:
            label = _describe(getattr(importlib.import_module(name), launch.kernel), sig, const, options) + note
            jobs[key] = Job(name, launch.kernel, target, sig, const, attrs, options, label)

    for name in modules:
        module = importlib.import_module(name)
        space = spaces.get(name)
        if space is None:
            problems.append(f"{name}: no launch space (tools/triton_launches.py)")
            continue

        def launches(point, space=space):
            with captured_launches() as found:
                space.stand_in(**point)
            return found

        seen = set()
        points = launch_points(space)
        typed = points[: len(space.axes["dtype"]) * (1 + len(space.corners))]
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
                problems.append(f"{name}.{kernel}: a kernel that its stand-in never launches")
        base = {axis: values[0] for axis, values in space.axes.items()}
        for start in (base, *({**base, **c} for c in space.corners)):
            for axis in size_axes(space):
                largest = max(space.axes[axis])
                at_max = {_signature_key(x, targets[0]) for x in launches({**start, axis: largest})}
                beyond = {_signature_key(x, targets[0]) for x in launches({**start, axis: SATURATION_FACTOR * largest})}
                for kernel, *_ in sorted(beyond - at_max):
                    problems.append(
                        f"{name}.{kernel}: {axis}={SATURATION_FACTOR * largest} launches a configuration that "
                        f"{axis}={largest} does not (an uncapped block size? cap it, or extend its axis)"
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
    u.code = ptx_code(compiled.asm["ptx"])
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


def _cuobjdump(obj: Path, what: str) -> str:
    """``cuobjdump -<what>`` of an object (Triton's copy of the tool: CUDA toolkits may lack it)."""
    from triton import knobs

    return subprocess.run([knobs.nvidia.cuobjdump.path, f"-{what}", str(obj)], capture_output=True, text=True).stdout


def _max_threads(obj: Path) -> dict[tuple[str, int], int]:
    """{(mangled kernel, arch): threads} from __launch_bounds__ (EIATTR_MAX_THREADS in the ELF)."""
    text = _cuobjdump(obj, "elf")
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
        codes = sass_code(_cuobjdump(obj, "sass")) if obj.exists() else {}
        current = None
        for line in log.read_text().splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)a?'", line)
            if m:
                name, target = m.group(1), int(m.group(2))
                current = Usage(name, target, "", threads=threads.get((name, target)), code=codes.get((name, target)))
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


def _loads_cell(u: Usage) -> str:
    return "?" if u.code is None else f"{u.code.wide_loads} of {u.code.loads}"


def _local_cell(u: Usage) -> str:
    return f"{u.stack} / " + ("?" if u.code is None else str(u.code.local))


def _tensor_cell(u: Usage) -> str:
    return "?" if u.code is None else ", ".join(u.code.tensor) or "none"


def table(usages: list[Usage]) -> list[str]:
    """Markdown rows, one per kernel and configuration, each cell 'sm_80 / sm_90' where they differ."""
    rows = {}
    for u in usages:
        rows.setdefault((u.kernel, u.config), {})[u.target] = u
    lines = [
        "| kernel | configuration | registers / thread | spill stores / loads (B) | local: stack (B) / ld+st "
        "| shared memory (B) | blocks × threads per SM (occupancy, limit) | 128-bit global loads | tensor cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, config), per_target in rows.items():
        us = [per_target[t] for t in sorted(per_target)]
        if any(u.error for u in us):
            lines.append(f"| {kernel} | {config} | compile error | | | | | | |")
            continue
        lines.append(
            f"| {kernel} | {config} | {_pair(u.regs for u in us)} "
            f"| {_pair(f'{u.spill_stores} / {u.spill_loads}' for u in us)} | {_pair(_local_cell(u) for u in us)} "
            f"| {_pair(u.shared for u in us)} | {_pair(_occupancy_cell(u) for u in us)} "
            f"| {_pair(_loads_cell(u) for u in us)} | {_pair(_tensor_cell(u) for u in us)} |"
        )
    return lines


def kernel_summary(usages: list[Usage]) -> list[str]:
    """Markdown rows, one per kernel over all its configurations: the most registers, the lowest
    occupancy, local memory, the share of 128-bit global loads per target, and the tensor-core
    instructions of its sm_90 code (how many configurations hold each)."""
    per_kernel: dict[str, list[Usage]] = {}
    for u in usages:
        if not u.error:
            per_kernel.setdefault(u.kernel, []).append(u)
    lines = [
        "| kernel | most registers / thread | lowest occupancy (warps / SM) | local memory | 128-bit global loads "
        "(sm_80 / sm_90, all configurations) | tensor cores on sm_90 (configurations) |",
        "|---|---|---|---|---|---|",
    ]
    for kernel, us in sorted(per_kernel.items()):
        warps = [occupancy(u)[1] for u in us if u.threads]
        local = [u for u in us if u.local_memory]
        local_text = (
            f"stack ≤ {max(u.stack for u in local)} B, {sum(u.code.local for u in local if u.code)} ld/st "
            f"({len(local)} of {len(us)})"
            if local
            else "none"
        )
        loads = []
        for target in TARGETS:
            codes = [u.code for u in us if u.target == target and u.code]
            wide, total = sum(c.wide_loads for c in codes), sum(c.loads for c in codes)
            loads.append(f"{wide} of {total}" if codes else "?")
        sm90 = [u.code.tensor for u in us if u.target == 90 and u.code]
        kinds = sorted({k for t in sm90 for k in t})
        tensor = [f"{k} ({sum(k in t for t in sm90)})" for k in kinds]
        if any(not t for t in sm90):
            tensor.append(f"none ({sum(not t for t in sm90)})")
        lines.append(
            f"| {kernel} | {max(u.regs for u in us)} | {min(warps) if warps else '?'} / 64 | {local_text} "
            f"| {' / '.join(loads)} | {', '.join(tensor)} |"
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
    local = sorted({u.kernel for u in all_usage if u.local_memory})
    sm80, sm90 = SM_LIMITS[80], SM_LIMITS[90]
    lines = [
        f"Generated {datetime.date.today().isoformat()} by `make gpu-resources` (`tools/gpu_compile_check.py "
        f"--write-results`; `make gpu-compile-check`, part of `make test`, prints the same table), on a machine "
        f"without a GPU: {toolchain()}. {timing}.",
        "",
        "Every Triton kernel is compiled as its launcher would launch it: the configurations come from each "
        "module's launch space (tools/triton_launches.py) run through the launchers themselves (base and "
        "largest blocks in every dtype, then every other value of every axis once; see docs/kernels.md). CUDA "
        "kernels: every template instance `make cuda-check` compiles (nvcc `-Xptxas -v`), the block size from "
        "`__launch_bounds__`.",
        "",
        "Occupancy: resident blocks × threads per SM and the share of the SM's 64 warp slots, with what limits "
        "it. Assumptions (CUDA occupancy calculator rules): "
        f"sm_90 on an H100/H200-class SM: {sm90['regs'] // 1024}K 32-bit registers, {sm90['threads']} threads, "
        f"{sm90['blocks']} blocks, {sm90['smem'] // 1024} KB shared memory "
        f"({sm90['smem_block'] // 1024} KB per block); "
        f"sm_80 on an A100 SM: the same but {sm80['smem'] // 1024} KB ({sm80['smem_block'] // 1024} KB per block); "
        f"registers allocated per warp in units of {REG_UNIT}; {SMEM_RESERVED} B of shared memory reserved per block "
        "by the runtime. Shared memory is Triton's own (fixed per configuration) or the CUDA kernel's static "
        "shared memory; dynamic shared memory a CUDA launcher asks for at launch is not counted. Cells read "
        "`sm_80 / sm_90` where the two differ.",
        "",
        "What the code does, counted statically in each kernel's instructions (Triton: its PTX; CUDA: the SASS "
        "of `cuobjdump -sass build/cuda-check/<op>.o`): global loads, and of them those that move 128 bits or "
        "more per thread (`ld.global.v4.b32`, `ld.global.v2.b64`, `cp.async` of 16 bytes, bulk tensor copies; "
        "`LDG.E.128`, `LDGSTS…128`, `UTMALDG`); local memory (ptxas's stack frame, `ld/st.local`, "
        "`LDL`/`STL`); tensor-core instructions by input type (`wgmma.mma_async` / `HGMMA` as wgmma, "
        "`mma.sync` / `HMMA` / `DMMA` as mma.sync). Static counts say whether the wide loads are there, not "
        "how often each runs. The per-kernel sums below add up every configuration (for sm_90 also the "
        "compiles with float arguments typed float64).",
        "",
        f"Spills: {'none' if not spilling else ', '.join(spilling)}. Local memory: "
        + (", ".join(local) if local else "none")
        + f" (must be none in the kernels of {', '.join(NO_LOCAL_MEMORY_OPS)}: the check fails there).",
        "",
        *kernel_summary(all_usage),
    ]
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
    """What fails the check: the drift problems, every compile error, every register spill, local
    memory in a kernel of NO_LOCAL_MEMORY_OPS, a CUDA kernel without __launch_bounds__ (its block
    size, which the occupancy needs, is unknown)."""
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
        + [
            f"{u.kernel} [{u.config}] sm_{u.target}: local memory (stack {u.stack} B, "
            f"{u.code.local if u.code else '?'} local loads/stores): none allowed in {u.op}'s kernels"
            for u in usages
            if u.local_memory and u.op in NO_LOCAL_MEMORY_OPS and not u.spills
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
