"""Which implementation an op call runs: the op table, the backend choice and the registration.

Every op has up to four backends: ``reference`` (plain PyTorch, the executable form of
docs/ops.md), ``cpu`` (C++/OpenMP), ``cuda`` (CUDA C++) and ``triton``. By default a call runs the
fastest one available for its tensors' device. Force one with ``BUSSEG_BACKEND=<name>`` (read at
call time) or ``with busseg_ops.use_backend("<name>"):`` (the innermost context wins over the
variable). Asking for a backend that cannot run is an error saying why, never a silent fallback.

An op is one :class:`Op` row: its name is the public function, the schemas ``busseg::<name>`` (the
C++ kernels of ``cpu`` and ``cuda``) and ``busseg_triton::<name>``, each with ``<name>_backward``
when differentiable, and the files ``ops/<name>.py``, ``reference/<name>.py``,
``triton/<name>.py`` and ``csrc/<name>/``. :func:`dispatch` returns the callable to run;
:func:`register` registers the fake kernels and the autograd of the native and Triton variants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
_FASTEST_FIRST = ("cuda", "cpu", "triton", "reference")
_forced: list[str] = []

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

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b not in self.missing)


def _triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _can_run(name: str, kind: str) -> bool:
    """Whether backend ``name`` runs on ``kind`` tensors here (the per-call test)."""
    if name == "reference":
        return True
    if name == "cpu":
        return kind == "cpu"
    if name == "cuda":
        return kind == "cuda" and _HAS_CUDA_KERNELS
    return _HAS_TRITON and (kind == "cuda" or (kind == "cpu" and _triton_runs_on_cpu()))


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


def choose_backend(op: Op, device: torch.device) -> str:
    """The backend ``op`` runs for tensors on ``device``: the forced one, else the fastest the op
    has that runs there. An unknown, missing or unavailable forced backend raises, with the reason."""
    name = _forced[-1] if _forced else os.environ.get("BUSSEG_BACKEND") or None
    kind = device.type
    if name is None:
        for fastest in _FASTEST_FIRST:
            if fastest not in op.missing and _can_run(fastest, kind):
                return fastest
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
    op ``busseg::<name>`` (cpu and cuda kernels) or its Triton op ``busseg_triton::<name>``."""
    backend = choose_backend(op, device)
    if backend == "reference":
        return op.reference
    if backend == "triton":
        return getattr(torch.ops.busseg_triton, op.name)
    return getattr(torch.ops.busseg, op.name)


def register(
    op: Op,
    *,
    fake: Callable,
    fake_backward: Callable | None = None,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
) -> None:
    """Registers ``op`` once for all its variants: the fake kernels of ``busseg::<name>`` (and of
    ``<name>_backward``), and, for a differentiable op, autograd for ``busseg::<name>`` and
    ``busseg_triton::<name>`` alike. ``backward(backward_op)`` returns the autograd backward
    function of the variant whose backward op is ``backward_op``. Importing the Triton module
    registers the Triton ops (its fake kernels come from tracing the launchers)."""
    torch.library.register_fake(f"busseg::{op.name}")(fake)
    if fake_backward is not None:
        torch.library.register_fake(f"busseg::{op.name}_backward")(fake_backward)
    namespaces = ["busseg"]
    if "triton" not in op.missing and _HAS_TRITON:
        importlib.import_module(f"busseg_ops.triton.{op.name}")
        namespaces.append("busseg_triton")
    if backward is None:
        return
    for namespace in namespaces:
        backward_op = getattr(getattr(torch.ops, namespace), f"{op.name}_backward")
        torch.library.register_autograd(f"{namespace}::{op.name}", backward(backward_op), setup_context=setup_context)


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
