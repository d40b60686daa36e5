"""Float32 matmul precision for the tests of the tensor-core kernels (memory_contrastive_loss,
cross_layer_alignment_loss): setting PyTorch's precision for a block, and TF32 emulated on the CPU.

TF32 keeps float32's exponent and 10 of its 23 mantissa bits. The tensor cores read float32
operands as TF32 by ignoring the low 13 bits (Triton feeds them raw; cuBLAS may round first), so
an operand's relative error is below 2^-10: the worst case, which ``to_tf32`` reproduces."""

import contextlib

import pytest
import torch

#: Every (dtype, float32 matmul precision) the tensor-core kernels are tested in.
every_precision = pytest.mark.parametrize(
    "dtype,precision",
    [
        (torch.float32, "ieee"),
        (torch.float32, "tf32"),
        (torch.float16, "ieee"),
        (torch.bfloat16, "ieee"),
        (torch.float64, "ieee"),
    ],
    ids=["fp32", "tf32", "fp16", "bf16", "fp64"],
)

#: The relative error bound of one operand read as TF32 (truncation).
TF32_EPS = 2.0**-10


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.backends.cuda.matmul.fp32_precision = precision ("ieee" or "tf32") inside the block."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x's values read as TF32 (the low 13 mantissa bits of their float32 form cleared), in x's
    dtype; gradients pass straight through."""
    bits = x.detach().float().view(torch.int32) & ~0x1FFF
    return x + (bits.view(torch.float32).to(x.dtype) - x).detach()
