"""Shared test set-up. Without a GPU, Triton kernels run on the CPU through its interpreter; the
variable must be set before triton is first imported."""
import os

if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import busseg_ops


def backends(device: str = "cpu", exclude: tuple[str, ...] = ()) -> list[str]:
    """Non-reference backends that run on ``device`` here."""
    return [b for b in busseg_ops.available_backends(device) if b != "reference" and b not in exclude]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
            torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh inputs, replayable failures."""
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
