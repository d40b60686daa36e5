"""The precision of the Triton kernels' matrix products (tl.dot), as PyTorch decides it for its own:
float32 operands go through TF32 tensor cores exactly when a float32 matmul on CUDA may
(``torch.backends.cuda.matmul.fp32_precision == "tf32"``: set by
``torch.set_float32_matmul_precision("high" | "medium")``, ``torch.backends.cuda.matmul.allow_tf32
= True`` or the ``fp32_precision`` API itself), else they are exact ("ieee"). Inductor decides its
own Triton matmuls by the same test (torch/_inductor/codegen/triton.py), which, unlike the legacy
``allow_tf32`` getter, never raises when the legacy and new APIs were mixed.

float16 / bfloat16 operands always run on tensor cores with float32 accumulation, float64 ones
exactly (sm_80+ DMMA); for them the precision argument is "ieee" and means nothing more.

The launchers read the setting on every call. Under torch.compile they run when the graph is
traced, and Dynamo's global-state guard covers this setting (a compiled graph recompiles when it
changes, as Inductor's own matmul templates need): a graph never keeps a stale precision."""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for operands of ``dtype``: "tf32" or "ieee"."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32":
        return "tf32"
    return "ieee"
