"""Which implementation an op call runs.

Every op has up to four backends: ``reference`` (plain PyTorch, the executable spec), ``cpu``
(C++/OpenMP), ``cuda`` (CUDA C++) and ``triton``. By default a call runs the fastest one available
for its tensors' device. Force one with ``BUSSEG_BACKEND=<name>`` (read at call time) or
``with busseg_ops.use_backend("<name>"):`` (the innermost context wins over the variable).
Asking for a backend that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
_forced: list[str] = []

_HAS_TRITON = importlib.util.find_spec("triton") is not None
# The CUDA kernels exist only in a CUDA build of the extension; ARP is the witness op.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("busseg::arp_forward", "CUDA")


def _triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here; for tensors on ``device`` when given, else on any device."""
    if device is None:
        found = {"reference", "cpu"}
        for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            found.update(available_backends(dev))
        return [b for b in BACKENDS if b in found]
    kind = torch.device(device).type
    found = ["reference"]
    if kind == "cpu":
        found.append("cpu")
        if _HAS_TRITON and _triton_runs_on_cpu():
            found.append("triton")
    elif kind == "cuda":
        if _HAS_CUDA_KERNELS:
            found.append("cuda")
        if _HAS_TRITON:
            found.append("triton")
    return found


def _why_unavailable(name: str, kind: str) -> str:
    if name == "cuda" and not _HAS_CUDA_KERNELS:
        return "this build has no CUDA kernels (rebuild with a CUDA toolkit or FORCE_CUDA=1)"
    if name == "triton" and not _HAS_TRITON:
        return "triton is not installed"
    if name == "triton" and kind == "cpu":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"it does not run on {kind} tensors"


def selected_backend(device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend an op supporting ``supported`` runs for tensors on ``device``."""
    name = _forced[-1] if _forced else os.environ.get("BUSSEG_BACKEND") or None
    available = [b for b in available_backends(device) if b in supported]
    if name is None:
        for fastest in ("cuda", "cpu", "triton", "reference"):
            if fastest in available:
                return fastest
    if name not in BACKENDS:
        raise ValueError(f"unknown busseg backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in supported:
        raise RuntimeError(f"busseg backend {name!r} is not implemented for this op (it has {', '.join(supported)})")
    if name not in available:
        raise RuntimeError(
            f"busseg backend {name!r} is not available for {device.type} tensors: "
            f"{_why_unavailable(name, device.type)}; available: {', '.join(available)}"
        )
    return name


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
