"""Which implementation an op call runs: the op table, the backend choice and the registration.

Every op has up to four backends: ``reference`` (plain PyTorch, the executable form of
docs/ops.md), ``cpu`` (C++/OpenMP), ``cuda`` (CUDA C++) and ``triton``. By default a call runs the
fastest one available for its tensors' device. Force one with ``BUSSEG_BACKEND=<name>`` (read at
call time) or ``with busseg_ops.use_backend("<name>"):`` (the innermost context wins over the
variable). Asking for a backend that cannot run is an error saying why, never a silent fallback.

An op is one :class:`Op` row: its name is the public function, the schemas ``busseg::<name>`` (the
C++ kernels of ``cpu`` and ``cuda``) and ``busseg_triton::<name>``, each with ``<name>_backward``
when differentiable, and the files ``ops/<name>.py``, ``reference/<name>.py``,
``triton/<name>.py`` and ``csrc/<name>/``. :func:`dispatch` returns the callable to run (in eager
a native op's direct call, busseg_ops._C.native_op); :func:`register` registers the fake and
autocast kernels (the native op's autograd is C++: csrc/<name>/autograd.cpp); :func:`load_triton`
registers the Triton variants, on their first dispatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping

import torch

from . import _C

BACKENDS = ("reference", "cpu", "cuda", "triton")
_FASTEST_FIRST = ("cuda", "cpu", "triton", "reference")
_forced: list[str] = []
# looked up once: on every op call, attribute lookups through torch's modules add up
_is_compiling = torch.compiler.is_compiling
_any_autocast_enabled = torch._C._is_any_autocast_enabled
#: (op name, backend) -> what an eager call of the op's native or Triton variant calls (dispatch)
_eager_kernels: dict[tuple[str, str], Callable] = {}
#: (op name, device) -> the same for the fastest backend there that is not the reference (what a
#: call runs unless a backend is forced)
_fastest_kernels: dict[tuple[str, torch.device], Callable] = {}

_HAS_TRITON = importlib.util.find_spec("triton") is not None
# The CUDA kernels exist only in a CUDA build of the extension; ARP is the witness op.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("busseg::adjacent_relation_propagation", "CUDA")


@dataclasses.dataclass(frozen=True)
class Op:
    """One op's row of the table.

    ``reference`` takes the arguments of the native op ``busseg::<name>`` and returns what it
    returns (autograd by PyTorch). ``missing`` maps each backend the op lacks to the reason.
    """

    name: str
    reference: Callable
    missing: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: under torch.autocast its floating inputs are cast to ``"float32"`` (losses and entropies,
    #: as torch's own) or to the autocast dtype (``"lower"``), and it runs with autocast off;
    #: None: it runs in its inputs' dtypes (it takes all of them; indices or a gather come out).
    autocast: str | None = None

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b not in self.missing)


# Triton decides at a kernel's decoration (when load_triton imports the Triton modules) whether it
# runs in the interpreter; busseg_ops reads the variable at its import: set it before both.
_TRITON_RUNS_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def _can_run(name: str, kind: str) -> bool:
    """Whether backend ``name`` runs on ``kind`` tensors here."""
    if name == "reference":
        return True
    if name == "cpu":
        return kind == "cpu"
    if name == "cuda":
        return kind == "cuda" and _HAS_CUDA_KERNELS
    return _HAS_TRITON and (kind == "cuda" or (kind == "cpu" and _TRITON_RUNS_ON_CPU))


def _why_unavailable(name: str, kind: str) -> str:
    """Why backend ``name`` cannot run on ``kind`` tensors here (for the error message)."""
    if name == "cuda" and kind == "cuda":
        return "this build has no CUDA kernels (rebuild with a CUDA toolkit or FORCE_CUDA=1)"
    if name == "triton" and not _HAS_TRITON:
        return "triton is not installed"
    if name == "triton" and kind == "cpu":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"it does not run on {kind} tensors"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here; for tensors on ``device`` when given, else on any device."""
    if device is not None:
        kinds = [torch.device(device).type]
    else:
        kinds = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [b for b in BACKENDS if any(_can_run(b, k) for k in kinds)]


_ENVIRON, _BACKEND_VARIABLE = os.environ._data, os.environ.encodekey("BUSSEG_BACKEND")


def _backend_variable() -> str | None:
    """BUSSEG_BACKEND now, None if unset or empty. Read from os.environ's own mapping:
    os.environ.get of an unset variable raises and catches a KeyError inside, about 1 µs (a fifth
    of a small op's call)."""
    value = _ENVIRON.get(_BACKEND_VARIABLE)
    return os.environ.decodevalue(value) if value else None


def choose_backend(op: Op, device: torch.device) -> str:
    """The backend ``op`` runs for tensors on ``device``: the forced one, else the fastest the op
    has that runs there. An unknown, missing or unavailable forced backend raises, with the reason."""
    return _choose(op, device.type, _forced[-1] if _forced else _backend_variable())


def _choose(op: Op, kind: str, name: str | None) -> str:
    if name is None:
        return next(b for b in _FASTEST_FIRST if b not in op.missing and _can_run(b, kind))
    if name not in BACKENDS:
        raise ValueError(f"unknown busseg backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in op.missing:
        raise RuntimeError(
            f"busseg backend {name!r} is not implemented for {op.name}: {op.missing[name]} "
            f"(it has {', '.join(op.backends)})"
        )
    if not _can_run(name, kind):
        available = [b for b in op.backends if _can_run(b, kind)]
        raise RuntimeError(
            f"busseg backend {name!r} is not available for {kind} tensors: {_why_unavailable(name, kind)}; "
            f"available: {', '.join(available)}"
        )
    return name


def dispatch(op: Op, device: torch.device) -> Callable:
    """The callable that runs ``op`` for tensors on ``device``: its reference function, its native
    op ``busseg::<name>`` (cpu and cuda kernels) or its Triton op ``busseg_triton::<name>``. Under
    torch.autocast the reference follows the op's autocast rule as the registered ops do."""
    name = _forced[-1] if _forced else _backend_variable()
    eager = not _is_compiling()
    if name is None and eager:  # the default: the fastest backend's op, looked up once per op and device
        kernel = _fastest_kernels.get((op.name, device))
        if kernel is not None:
            return kernel
    backend = _choose(op, device.type, name)
    if backend == "reference":
        return _autocast_kernel(op, op.reference, device.type) if _autocast_dtype(op, device.type) else op.reference
    if not eager:
        return _overload(op, backend)  # what torch.compile traces
    kernel = _eager_kernels.get((op.name, backend))
    if kernel is None:
        overload = _overload(op, backend)
        # The native op is called directly from its Python arguments (csrc/python_module.cpp:
        # about 1.4 µs less than torch.ops' boxed call), the Triton op through its OpOverload's _op
        # (OpOverload.__call__ only adds a Python frame).
        kernel = overload._op if backend == "triton" else _C.native_op(op.name, overload._op)
        _eager_kernels[op.name, backend] = kernel
    if name is None:
        _fastest_kernels[op.name, device] = kernel
    return kernel


def _overload(op: Op, backend: str) -> torch._ops.OpOverload:
    if backend == "triton":
        load_triton()
    return getattr(torch.ops.busseg_triton if backend == "triton" else torch.ops.busseg, op.name).default


def register(
    op: Op,
    *,
    fake: Callable,
    fake_backward: Callable | None = None,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
) -> None:
    """Registers ``op`` once for all its variants: the fake kernels of ``busseg::<name>`` (and of
    ``<name>_backward``), the autocast kernels, and, for a differentiable op, the autograd of
    ``busseg_triton::<name>``: ``backward(backward_op)`` returns its backward function given its
    backward op. ``busseg::<name>``'s autograd is C++ (csrc/<name>/autograd.cpp, a few µs a call
    where Python autograd cost about 16). The Triton variant is registered by :func:`load_triton`."""
    torch.library.register_fake(f"busseg::{op.name}")(fake)
    if fake_backward is not None:
        torch.library.register_fake(f"busseg::{op.name}_backward")(fake_backward)
    _register_autocast(op, "busseg")
    if "triton" not in op.missing and _HAS_TRITON:
        _pending_triton.append((op, backward, setup_context))


def load_triton() -> None:
    """Registers the ops ``busseg_triton::<name>`` (importing busseg_ops.triton.<name>, whose fake
    kernels come from tracing the launchers) with their autocast kernels and autograd. Runs on a
    Triton call's first dispatch, so that ``import busseg_ops`` leaves triton and torch._inductor
    (which Triton ops import) unloaded: ``busseg --help`` costs about an ``import torch``. Call it
    before using ``torch.ops.busseg_triton`` directly. Idempotent."""
    while _pending_triton:
        op, backward, setup_context = _pending_triton.pop(0)
        importlib.import_module(f"busseg_ops.triton.{op.name}")
        _register_autocast(op, "busseg_triton")
        if backward is not None:
            backward_op = _autocast_off(getattr(torch.ops.busseg_triton, f"{op.name}_backward"))
            torch.library.register_autograd(
                f"busseg_triton::{op.name}", backward(backward_op), setup_context=setup_context
            )


#: (op, backward, setup_context) of the ops whose Triton variant load_triton has yet to register
_pending_triton: list[tuple[Op, Callable | None, Callable | None]] = []


def _register_autocast(op: Op, namespace: str) -> None:
    if op.autocast is None:
        return
    library = torch.library.Library(namespace, "IMPL")
    _LIBRARIES.append(library)  # a registration lives as long as its Library object
    fn = getattr(getattr(torch.ops, namespace), op.name).default
    for device_type in ("cpu", "cuda"):
        library.impl(op.name, _autocast_kernel(op, fn, device_type), _AUTOCAST_KEYS[device_type])


# ---- autocast ------------------------------------------------------------------------------
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIBRARIES: list[torch.library.Library] = []


def _autocast_dtype(op: Op, device_type: str) -> torch.dtype | None:
    """The dtype ``op``'s floating inputs take under the autocast state of ``device_type``, or None
    (autocast off there, or an op that runs in its inputs' dtypes)."""
    if op.autocast is None or device_type not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
        return None
    return torch.float32 if op.autocast == "float32" else torch.get_autocast_dtype(device_type)


def _cast(obj, dtype: torch.dtype):
    """``obj`` with every floating tensor of a (nested) list / tuple cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


def _autocast_kernel(op: Op, fn: Callable, device_type: str) -> Callable:
    """``fn`` under ``op``'s autocast rule: inputs cast, then run with autocast off (as torch's own
    autocast kernels do). Registered at the op's Autocast dispatch keys."""

    def kernel(*args):
        dtype = _autocast_dtype(op, device_type)
        with torch.autocast(device_type, enabled=False):
            return fn(*(args if dtype is None else _cast(args, dtype)))

    return kernel


def _autocast_off(fn: Callable) -> Callable:
    """``fn`` run with autocast off: a backward called inside an autocast region (or traced there)
    must not have the ATen products inside the kernels cast to another dtype under it."""

    def run(*args):
        with contextlib.ExitStack() as stack:
            for device_type in _AUTOCAST_KEYS:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args)

    return run


def autocast_inputs(op: Op, *args):
    """The arguments as ``op`` will see them under torch.autocast (the front-ends check these): its
    floating tensors cast by the op's rule when autocast is on for their device; else unchanged."""
    if op.autocast is None or not _any_autocast_enabled():  # the usual case: one C call
        return args
    device = next((t.device for t in _tensors(args)), None)
    dtype = None if device is None else _autocast_dtype(op, device.type)
    return args if dtype is None else _cast(args, dtype)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


@contextlib.contextmanager
def use_backend(name: str):
    """Run busseg ops inside the block with backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown busseg backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
