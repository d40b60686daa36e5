"""Backend choice (busseg_ops.backends): the forced backend (local to a thread and an asyncio
task, eager and compiled), the backend table behind the choice and the reasons a backend cannot
run, the op table behind every op, and where each variant's autograd lives."""

import asyncio
import contextlib
import importlib
import pathlib
import threading

import pytest
import torch
from op_contract import OpContract, map_tensors, tensors_in
from torch.overrides import TorchFunctionMode

import busseg_ops
from busseg_ops import adjacent_relation_propagation as arp
from busseg_ops import greedy_proxy_sampling
from busseg_ops.backends import BACKENDS, TABLE, choose_backend, dispatch
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
        with busseg_ops.use_backend("cpu"):  # the innermost wins
            assert choose_backend(GREEDY, feat.device) == "cpu"
        assert choose_backend(GREEDY, feat.device) == "reference"
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


@pytest.mark.parametrize("kind", ["cpu", "cuda", "meta"])
def test_availability_the_order_and_the_reasons_come_from_the_table(kind):
    """available_backends is the table's backends whose reason is None; the default is the one of
    highest priority; forcing any other says its reason."""
    runs = [b for b in TABLE if b.unavailable(kind) is None]
    assert [b.name for b in runs] == busseg_ops.available_backends(kind)
    fastest = max((b for b in runs if b.name not in GREEDY.missing), key=lambda b: b.priority)
    assert choose_backend(GREEDY, torch.device(kind)) == fastest.name
    assert BACKENDS == tuple(b.name for b in TABLE) and TABLE[0].name == "reference"
    for b in TABLE:
        if b.unavailable(kind) is not None and b.name not in GREEDY.missing:
            with busseg_ops.use_backend(b.name), pytest.raises(RuntimeError) as error:
                choose_backend(GREEDY, torch.device(kind))
            why = f"{b.name!r} is not available for {kind} tensors: {b.unavailable(kind)}; available: "
            assert why in str(error.value)


def _sees_only_its_own(name, barrier, seen):
    """Forces ``name``, waits until the other thread has forced its own, records what it sees."""
    cpu = torch.device("cpu")
    with busseg_ops.use_backend(name):
        barrier.wait()
        seen[name] = [choose_backend(GREEDY, cpu), dispatch(GREEDY, cpu) is GREEDY.reference]
        barrier.wait()
    seen[name].append(choose_backend(GREEDY, cpu))


def test_the_forced_backend_is_local_to_a_thread():
    barrier, seen = threading.Barrier(2, timeout=60), {}
    threads = [threading.Thread(target=_sees_only_its_own, args=(n, barrier, seen)) for n in ("cpu", "reference")]
    with busseg_ops.use_backend("reference"):  # nor does a new thread see this one's
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert seen == {"cpu": ["cpu", False, "cpu"], "reference": ["reference", True, "cpu"]}
    assert choose_backend(GREEDY, torch.device("cpu")) == "cpu"


def test_the_forced_backend_is_local_to_an_asyncio_task():
    """Tasks that force different backends interleave without seeing each other's; a task starts
    with the backend forced where it was created."""
    cpu = torch.device("cpu")

    async def forces(name):
        seen = []
        with busseg_ops.use_backend(name):
            for _ in range(3):
                await asyncio.sleep(0)  # the other task runs, inside its own use_backend
                seen.append(choose_backend(GREEDY, cpu))
        return seen

    async def inherits():
        return choose_backend(GREEDY, cpu)

    async def main():
        both = await asyncio.gather(forces("cpu"), forces("reference"))
        with busseg_ops.use_backend("reference"):
            task = asyncio.create_task(inherits())
        return both, await task

    assert asyncio.run(main()) == ([["cpu"] * 3, ["reference"] * 3], "reference")


def test_a_compiled_graph_follows_the_forced_backend():
    """torch.compile reads the forced backend when it traces and guards on it, in the calling
    thread: another backend traces again, and each thread runs the graph of its own backend."""
    graphs, ran = [], []

    def record(gm, example_inputs):
        index = len(graphs)
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})

        def run(*args):
            ran.append(index)
            return gm.forward(*args)

        return run

    feat, value = torch.randn(1, 3, 5, 6), torch.randn(1, 2, 5, 6)
    compiled = torch.compile(lambda feat, value: arp(feat, value), backend=record, fullgraph=True)
    with busseg_ops.use_backend("reference"):
        expected = arp(feat, value)
        torch.testing.assert_close(compiled(feat, value), expected)
    with busseg_ops.use_backend("cpu"):
        torch.testing.assert_close(compiled(feat, value), expected)
    native = "busseg.adjacent_relation_propagation.default"
    assert len(graphs) == 2 and native not in graphs[0] and native in graphs[1]

    def in_thread(name):
        with busseg_ops.use_backend(name) if name else contextlib.nullcontext():
            compiled(feat, value)

    for here, there in [("cpu", "reference"), ("reference", None)]:  # None: nothing forced
        with busseg_ops.use_backend(here):
            thread = threading.Thread(target=in_thread, args=(there,))
            thread.start()
            thread.join()
    # the reference graph in the first thread; in the second a new graph, of the default (cpu)
    assert ran == [0, 1, 0, 2] and native in graphs[2]


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


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_native_autograd_is_cpp_and_triton_autograd_python(name):
    """A differentiable op's busseg:: autograd is a C++ kernel at the Autograd key
    (csrc/<op>/autograd.cpp: a few µs a call, where Python autograd cost about 16); its
    busseg_triton:: variant keeps torch.library's Python autograd. Ops without a backward have none."""
    differentiable = hasattr(torch.ops.busseg, f"{name}_backward")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"busseg::{name}", "Autograd") == differentiable
    assert (ROOT / f"csrc/{name}/autograd.cpp").exists() == differentiable
    if differentiable and "triton" in busseg_ops.available_backends():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"busseg_triton::{name}", "Autograd")


def _differentiable_calls(device):
    """(name, loss(), leaves) of every differentiable op on small float32 inputs on ``device``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    feat, value = randn(2, 5, 6, 7), randn(2, 2, 6, 7)
    feats, proxies = [randn(2, 5, 6, 7), randn(2, 3, 6, 7)], [randn(2, 4, 5), randn(2, 4, 3)]
    x = randn(2, 3, 8, 8)
    anchors, negatives = randn(9, 6), randn(7, 6)
    ya, yn = torch.randint(0, 2, (9,), generator=g).to(device), torch.randint(0, 2, (7,), generator=g).to(device)
    positives = torch.randn(2, 6, generator=g).to(device)
    return [
        ("adjacent_relation_propagation", lambda: arp(feat, value).square().sum(), [feat, value]),
        ("cross_layer_alignment_loss", lambda: busseg_ops.cross_layer_alignment_loss(feats, proxies), feats + proxies),
        ("patch_entropy_hardness", lambda: busseg_ops.patch_entropy_hardness(x, 2, from_logits=True).sum(), [x]),
        (
            "memory_contrastive_loss",
            lambda: busseg_ops.memory_contrastive_loss(anchors, ya, negatives, yn, positives),
            [anchors, negatives],
        ),
    ]


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_backward_inside_autocast_runs_without_it(device):
    """A backward called inside an autocast region runs with autocast off (C++ and Python autograd
    alike): the ATen products inside the kernels (cuBLAS tiles of the contrastive loss, on CPUs
    without AVX-512 too) keep their dtype, so the gradients are those of a backward outside it."""
    for backend in [b for b in ("cpu", "cuda", "triton") if b in busseg_ops.available_backends(device)]:
        for name, loss, leaves in _differentiable_calls(device):
            with busseg_ops.use_backend(backend):
                expected = torch.autograd.grad(loss(), leaves)
                out = loss()
                with torch.autocast(device, torch.bfloat16):
                    got = torch.autograd.grad(out, leaves)
            for g, e in zip(got, expected):  # (a GPU kernel may sum in another order: not bitwise)
                assert g.dtype == e.dtype, f"{backend} {name}"
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"{backend} {name}")


def test_double_backward_raises():
    """The backward ops have no derivative: a backward with create_graph=True says so, where
    autograd's fallback warned and dropped the second-order terms."""
    for name, loss, leaves in _differentiable_calls("cpu"):
        with busseg_ops.use_backend("cpu"), pytest.raises(RuntimeError, match=f"busseg::{name}: no double backward"):
            torch.autograd.grad(loss(), leaves, create_graph=True)


class _Subclass(torch.Tensor):
    pass


class _SeesOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_native_ops_are_called_directly_in_eager(name):
    """In eager a native op goes from its Python arguments straight to the dispatcher
    (csrc/python_module.cpp) instead of torch.ops' boxed call, forced backend or not (so the op
    contract's comparisons run through it): the same outputs as torch.ops; a tensor subclass or a
    torch-function mode goes through torch.ops, where __torch_function__ sees the op, and so do
    keyword arguments; a call the C++ checks reject raises their error, of its type; a missing
    argument torch.ops' error."""
    op = importlib.import_module(f"busseg_ops.ops.{name}").OP
    module = importlib.import_module(f"test_{name}")
    contract = next(c for c in vars(module).values() if isinstance(c, type) and OpContract in c.__mro__[1:])()
    overload = getattr(torch.ops.busseg, name).default
    direct = dispatch(op, torch.device("cpu"))
    with busseg_ops.use_backend("cpu"):
        assert dispatch(op, torch.device("cpu")) is direct
    assert direct is not overload and direct is not overload._op
    for sample in [s for s in contract.raw_samples() if s.op == name]:
        expected = overload(*sample.args)
        contract.assert_same(direct(*sample.args), expected, f"{name} called directly", exact=True)
        as_subclass = map_tensors(lambda t: t.as_subclass(_Subclass), sample.args)
        assert all(type(t) is _Subclass for t in tensors_in(direct(*as_subclass)))
        with _SeesOps() as mode:
            contract.assert_same(direct(*sample.args), expected, f"{name} under a mode", exact=True)
        assert overload in mode.seen
        last = overload._schema.arguments[-1].name
        contract.assert_same(direct(*sample.args[:-1], **{last: sample.args[-1]}), expected, "keyword", exact=True)
        with pytest.raises(RuntimeError, match="missing value for argument"):
            direct(*sample.args[:-1])
        with pytest.raises(ValueError, match="must"):
            direct(*map_tensors(lambda t: t[None] if t.is_floating_point() else t, sample.args))


LAZY_TRITON = """
import sys
import torch
import busseg_ops
assert "torch._inductor" not in sys.modules and not hasattr(torch.ops.busseg_triton, "{name}")
x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
with busseg_ops.use_backend("triton"):
    y = busseg_ops.adjacent_relation_propagation(x, x.detach() + 1, kernel_size=3)
y.sum().backward()
with busseg_ops.use_backend("reference"):
    expected = busseg_ops.adjacent_relation_propagation(x, x.detach() + 1, kernel_size=3)
torch.testing.assert_close(y, expected)
print(hasattr(torch.ops.busseg_triton, "{name}"), x.grad.abs().sum().item() > 0)
"""


def test_triton_variants_register_on_first_dispatch():
    """`import busseg_ops` leaves the Triton ops (and torch._inductor) unloaded; the first Triton
    dispatch registers them with their autograd, in a fresh process."""
    import subprocess
    import sys

    if "triton" not in busseg_ops.available_backends("cpu"):
        pytest.skip("triton does not run on the CPU here")
    code = LAZY_TRITON.format(name="adjacent_relation_propagation")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"]
