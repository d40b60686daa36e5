"""Backend choice (busseg_ops.backends): the forced backend, the reasons a backend cannot run, and
the op table behind every op."""

import importlib
import pathlib

import pytest
import torch

import busseg_ops
from busseg_ops import adjacent_relation_propagation as arp
from busseg_ops import greedy_proxy_sampling
from busseg_ops.backends import BACKENDS, choose_backend
from busseg_ops.ops.greedy_proxy_sampling import OP as GREEDY


def test_environment_variable_selects_backend(monkeypatch):
    feat, value = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)
    monkeypatch.setenv("BUSSEG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' is not available for cpu"):
        arp(feat, value)
    monkeypatch.setenv("BUSSEG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown busseg backend 'nonsense'"):
        arp(feat, value)
    with busseg_ops.use_backend("reference"):  # the context manager wins over the variable
        arp(feat, value)
    with pytest.raises(ValueError, match="unknown busseg backend"):
        busseg_ops.use_backend("fastest").__enter__()


def test_a_missing_backend_says_why():
    with (
        busseg_ops.use_backend("triton"),
        pytest.raises(RuntimeError, match="not implemented for greedy_proxy_sampling: its steps"),
    ):
        greedy_proxy_sampling(torch.randn(1, 2, 3, 3), 2)


def test_default_is_the_fastest_the_op_has():
    cpu = torch.device("cpu")
    assert choose_backend(GREEDY, cpu) == "cpu"
    if torch.cuda.is_available():
        assert choose_backend(GREEDY, torch.device("cuda")) in ("cuda", "reference")
    assert choose_backend(GREEDY, torch.device("meta")) == "reference"


ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_OPS = [
    "adjacent_relation_propagation",
    "greedy_proxy_sampling",
    "cross_layer_alignment_loss",
    "patch_entropy_hardness",
    "adaptive_patch_cutmix",
    "memory_contrastive_loss",
]


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_every_op_has_one_name_in_every_layer(name):
    """busseg_ops.<op> comes from ops/<op>.py; reference/<op>.py, triton/<op>.py (where the op has
    a Triton backend), csrc/<op>/ and tests/test_<op>.py exist and name it; the schemas are
    busseg::<op> (and busseg_triton::<op>)."""
    op = importlib.import_module(f"busseg_ops.ops.{name}").OP
    assert op.name == name and getattr(busseg_ops, name).__module__ == f"busseg_ops.ops.{name}"
    assert set(op.backends) <= set(BACKENDS)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"busseg::{name}", "CPU")
    files = [f"busseg_ops/ops/{name}.py", f"busseg_ops/reference/{name}.py", f"tests/test_{name}.py"]
    files += [
        f"csrc/{name}/{f}" for f in ("schema.cpp", "checks.h", "cpu.cpp", "cuda.h", "cuda.cu", "cuda_binding.cpp")
    ]
    if "triton" in op.backends:
        files.append(f"busseg_ops/triton/{name}.py")
        if "triton" in busseg_ops.available_backends():
            assert hasattr(torch.ops.busseg_triton, name)
    for f in files:
        assert name in (ROOT / f).read_text(), f"{f} does not name {name}"
