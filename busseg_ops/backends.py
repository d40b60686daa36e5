"""Which implementation an op call runs: the op table, the backend table and the registration.

An op may run on four backends (reference PyTorch, C++ cpu, CUDA C++, Triton). One place decides
which, so that the front ends stay one line: by default the fastest backend that runs on the
tensors' device; forced with ``BUSSEG_BACKEND`` or ``use_backend``, where a backend that cannot run
is an error saying why, never a silent fallback. :func:`dispatch` runs on every eager op call:
what it does per call is kept to a few dictionary lookups.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping

import torch

from . import _C

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
    """One op's row of the table. Its name is the public function, the schemas ``busseg::<name>``
    (the C++ cpu and cuda kernels) and ``busseg_triton::<name>``, and the files ops/<name>.py,
    reference/<name>.py, triton/<name>.py and csrc/<name>/.

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


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend's row: by default a call runs the backend of highest ``priority`` that the op has
    and that runs on its tensors; ``unavailable(kind)`` is why it cannot run on ``kind`` tensors
    (a torch.device type) here, None when it can."""

    name: str
    priority: int
    unavailable: Callable[[str], str | None]


def _runs_on(only: str) -> Callable[[str], str | None]:
    return lambda kind: None if kind == only else f"it does not run on {kind} tensors"


def _cuda_unavailable(kind: str) -> str | None:
    if kind != "cuda":
        return f"it does not run on {kind} tensors"
    if not _HAS_CUDA_KERNELS:
        return "this build has no CUDA kernels (rebuild with a CUDA toolkit or FORCE_CUDA=1)"
    return None


def _triton_unavailable(kind: str) -> str | None:
    if not _HAS_TRITON:
        return "triton is not installed"
    if kind == "cpu" and not _TRITON_RUNS_ON_CPU:
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if kind not in ("cpu", "cuda"):
        return f"it does not run on {kind} tensors"
    return None


TABLE = (
    Backend("reference", 0, lambda kind: None),
    Backend("cpu", 2, _runs_on("cpu")),
    Backend("cuda", 3, _cuda_unavailable),
    Backend("triton", 1, _triton_unavailable),
)
BACKENDS = tuple(b.name for b in TABLE)
_BY_NAME = {b.name: b for b in TABLE}
_BY_PRIORITY = sorted(TABLE, key=lambda b: b.priority, reverse=True)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here; for tensors on ``device`` when given, else on any device."""
    if device is not None:
        kinds = [torch.device(device).type]
    else:
        kinds = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [b.name for b in TABLE if any(b.unavailable(k) is None for k in kinds)]


_ENVIRON, _BACKEND_VARIABLE = os.environ._data, os.environ.encodekey("BUSSEG_BACKEND")


def _backend_variable() -> str | None:
    """BUSSEG_BACKEND now, None if unset or empty. Read from os.environ's own mapping:
    os.environ.get of an unset variable raises and catches a KeyError inside, about 1 µs (a fifth
    of a small op's call)."""
    value = _ENVIRON.get(_BACKEND_VARIABLE)
    return os.environ.decodevalue(value) if value else None


#: The backend forced by use_backend, local to the thread and the asyncio task (each starts with
#: none; a task inherits its creator's).
_forced: contextvars.ContextVar[str] = contextvars.ContextVar("busseg_backend")
_forced_get = _forced.get


class _Traced:
    """``_TRACED.forced`` is the forced backend when torch.compile traces a call, ``_TRACED`` itself
    when none is (the getter is ``_forced.get(_TRACED)``). torch.compile cannot trace
    ``ContextVar.get``, but reads a property whose getter is a C function and guards on its value,
    so that a graph is traced again where the forced backend differs, in any thread or task."""

    __slots__ = ()
    forced = property(_forced_get)


_TRACED = _Traced()


def choose_backend(op: Op, device: torch.device) -> str:
    """The backend ``op`` runs for tensors on ``device``: the forced one, else the fastest the op
    has that runs there. An unknown, missing or unavailable forced backend raises, with the reason."""
    return _choose(op, device.type, _forced_get(None) or _backend_variable())


def _choose(op: Op, kind: str, name: str | None) -> str:
    if name is None:
        return next(b.name for b in _BY_PRIORITY if b.name not in op.missing and b.unavailable(kind) is None)
    backend = _BY_NAME.get(name)
    if backend is None:
        raise ValueError(f"unknown busseg backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in op.missing:
        raise RuntimeError(
            f"busseg backend {name!r} is not implemented for {op.name}: {op.missing[name]} "
            f"(it has {', '.join(op.backends)})"
        )
    why = backend.unavailable(kind)
    if why is not None:
        available = [b for b in op.backends if _BY_NAME[b].unavailable(kind) is None]
        raise RuntimeError(
            f"busseg backend {name!r} is not available for {kind} tensors: {why}; available: {', '.join(available)}"
        )
    return name


def dispatch(op: Op, device: torch.device) -> Callable:
    """The callable that runs ``op`` for tensors on ``device``: its reference function, its native
    op ``busseg::<name>`` (cpu and cuda kernels) or its Triton op ``busseg_triton::<name>``. Under
    torch.autocast the reference follows the op's autocast rule as the registered ops do."""
    if _is_compiling():
        return _traced_kernel(op, device)
    name = _forced_get(None) or _backend_variable()
    if name is None:  # the default: the fastest backend's op, looked up once per op and device
        kernel = _fastest_kernels.get((op.name, device))
        if kernel is not None:
            return kernel
    backend = _choose(op, device.type, name)
    if backend == "reference":
        return _reference_kernel(op, device.type)
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


def _traced_kernel(op: Op, device: torch.device) -> Callable:
    """What torch.compile traces for ``op``: the chosen backend's OpOverload or the reference."""
    forced = _TRACED.forced
    backend = _choose(op, device.type, _backend_variable() if forced is _TRACED else forced)
    return _reference_kernel(op, device.type) if backend == "reference" else _overload(op, backend)


def _reference_kernel(op: Op, kind: str) -> Callable:
    return _autocast_kernel(op, op.reference, kind) if _autocast_dtype(op, kind) else op.reference


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
    """Run busseg ops inside the block with backend ``name`` (in this thread or asyncio task only;
    it wins over BUSSEG_BACKEND)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown busseg backend {name!r}; choose one of {', '.join(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
