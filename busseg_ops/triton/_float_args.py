"""Float arguments of the Triton kernels: every one travels as two float32 halves, ``split`` here,
``join``-ed at the top of the kernel in the kernel's compute dtype. Two reasons, both seen on an H200:

- Triton's JIT types a Python float argument float32, so a float64 kernel saw its scale rounded to
  float32, a relative error of 3e-8 where float64 promises 1e-16 (ARP's float64 output missed the
  reference). hi + lo carries 48 bits of the mantissa.
- torch.compile (Inductor) passes the same argument float64 on a GPU, so float32 arithmetic with it
  became float64 and a loop-carried float32 accumulator failed to compile ("re-assigned to fp64 in
  loop"). ``join`` casts both halves to the compute dtype whatever they arrive as.

The interpreter (TRITON_INTERPRET=1) passes a Python float through unchanged, which is why only a
GPU showed either; tools/gpu_compile_check.py compiles each kernel with its floats typed float64
as well, which catches the second without one."""

import numpy as np
import torch
import triton
import triton.language as tl


def split(x: float) -> tuple[float, float]:
    """(hi, lo), both exact float32 values, with hi + lo = x to 48 bits; hi alone is x in float32.
    A symbolic float (torch.compile with dynamic shapes, e.g. 1/sqrt(C)) passes whole as hi: Inductor
    types it float64, and converting it here would specialise the graph on its value."""
    if isinstance(x, torch.SymFloat):
        return x, 0.0
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi)) if np.isfinite(hi) else 0.0


@triton.jit
def join(hi, lo, DTYPE: tl.constexpr):
    return tl.cast(hi, DTYPE) + tl.cast(lo, DTYPE)
