"""Argument checks shared by the public ops: each error names the argument and what was expected
(docs/ops.md, "Errors"). Sizes that would overflow the kernels' index arithmetic are rejected
here too, with the same limits as the C++ entry points (csrc/common/checks.h)."""

from __future__ import annotations

import math
import numbers

import torch

#: Sizes and reaches bounded by 2^30 keep index arithmetic in 32 bits where kernels use int.
MAX_EXTENT = 2**30

#: every op takes these on every device (the narrow two with float32 accumulation)
FLOATING_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(
    name: str, t, ndim: int | None = None, layout: str = "", floating: bool = True, allow_empty: bool = False
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOATING_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOATING_DTYPES)
        raise TypeError(f"{name} must be one of {names}, got {t.dtype}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def same(names: str, a: torch.Tensor, b: torch.Tensor, *, dims: tuple[int, ...] = (), dtype: bool = False) -> None:
    """a and b share device, the sizes at ``dims`` and, if asked, dtype."""
    if a.device != b.device:
        raise ValueError(f"{names} must be on the same device, got {a.device} and {b.device}")
    shape_a, shape_b = a.shape, b.shape
    for d in dims:
        if shape_a[d] != shape_b[d]:
            raise ValueError(f"{names} must share sizes at dims {dims}, got {tuple(shape_a)} and {tuple(shape_b)}")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{names} must have the same dtype, got {a.dtype} and {b.dtype}")


def integer(name: str, v, minimum: int | None = None, odd: bool = False, maximum: int = 2**63 - 1) -> int:
    """An int in [minimum, maximum] (by default within int64, what the C++ ops take); a bool is not
    one. Traced (torch.compile), a size-derived int is a SymInt."""
    if type(v) is not int and (isinstance(v, bool) or not isinstance(v, (int, torch.SymInt))):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    if odd and v % 2 == 0:
        raise ValueError(f"{name} must be odd, got {v}")
    return v


def real(name: str, v, *, minimum: float | None = None, positive: bool = False) -> float:
    """A finite real number as a float (a bool is not one), >= ``minimum`` or > 0 if ``positive``.
    Infinite or NaN scalars would reach the kernels, whose backends then disagree (or give NaN)."""
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond float's range
        f = math.inf
    if not math.isfinite(f) or (positive and f <= 0) or (minimum is not None and f < minimum):
        bound = " > 0" if positive else "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite float{bound}, got {v!r}")
    return f


def choice(name: str, v, options: tuple[str, ...]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")
    return v


def integer_tensor(name: str, t) -> None:
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def in_range(name: str, t: torch.Tensor, stop: int, what: str) -> None:
    """Every entry of ``t`` in [0, stop), checked on CPU tensors. On a GPU the check would read
    device memory (a host sync, which also rules out CUDA graphs), and under torch.compile it
    would break the graph: there the kernels guard their indices instead (torch's gather and
    index kernels assert on the device; the C++ ops check)."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        outside = (t < 0) | (t >= stop)
        if bool(outside.any()):
            raise ValueError(f"{name} must hold {what} in [0, {stop}), got {t[outside][0].item()}")


def one_device(op: str, **tensors: torch.Tensor) -> None:
    """All tensor arguments on one device (as csrc/common/checks.h), so that no device's kernel gets
    another device's pointer."""
    (first_name, first), *others = tensors.items()
    for name, t in others:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} must be on the device of {first_name} ({first.device}), got {t.device}")
