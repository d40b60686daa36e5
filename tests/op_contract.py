"""The contract every op's tests run (after torchvision's RoIOpTester and NATTEN's backend tests).

An op's test class subclasses :class:`OpContract` and supplies ``op`` (its row of the op table),
``cases`` and ``make_inputs(case, device)``, ``call`` (the public op), optionally ``reference`` and
the inputs of the other checks (``None`` skips one). The base then holds every backend that runs here
to the reference: values and gradients, gradcheck, opcheck, torch.compile, odd layouts, NaN, bad
inputs, raw-op calls, half precision and autocast (the list: docs/testing.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch
from conftest import devices, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import busseg_ops
from busseg_ops.backends import Op


def tensors_in(obj) -> list[torch.Tensor]:
    """The tensors of a (nested) tuple / list, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    return []


def map_tensors(fn, obj):
    """``obj`` with every tensor t of a (nested) tuple / list replaced by fn(t)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    return obj


def map_nth_tensor(fn, obj, n: int):
    """``obj`` with its n-th tensor (in the order of tensors_in) replaced by fn(t)."""
    counter = itertools.count()
    return map_tensors(lambda t: fn(t) if next(counter) == n else t, obj)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def floating_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor as a fresh leaf of ``dtype`` (requires_grad kept); others as they are."""
    return t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if t.dim() == 4 else t


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values viewed every other element of a wider tensor (non-contiguous): every other
    column, and of a 4-D map every other channel too."""
    if t.dim() < 2:
        return t
    index = (slice(None), slice(None, None, 2)) if t.dim() == 4 else (slice(None),)
    index = index + (slice(None),) * (t.dim() - len(index) - 1) + (slice(None, None, 2),)
    shape = [2 * n if isinstance(i, slice) and i.step == 2 else n for n, i in zip(t.shape, index)]
    wide = t.new_zeros(shape)
    wide[index] = t.detach()
    out = wide[index]
    return out.requires_grad_() if t.requires_grad else out


@dataclasses.dataclass
class RawSample:
    """A valid direct call of ``<namespace>::<op>`` and what may change in it and stay valid (for
    the raw-op fuzz test): ``free`` holds (argument, "dim", d), (argument, "rank"),
    (argument, "dtype"), (argument, "huge") for an int that may be arbitrarily large and
    (argument, "zero") for one that may be 0. A list argument stands for its element 0."""

    op: str
    args: tuple
    free: set = dataclasses.field(default_factory=set)


def bad(call: Callable, error: type, match: str):
    """A bad call and the exception (type, message pattern) it must raise."""
    return pytest.param((call, error, match), id=match[:40])


class OpContract:
    op: Op
    cases: list = []
    #: outputs compared with torch.equal instead of a tolerance
    exact = False
    #: layouts ("channels_last", "strided") whose results must equal the contiguous one exactly
    layout_exact: tuple = ()
    #: backends gradcheck runs (those the op has)
    gradcheck_backends = ("cpu", "reference")
    gradcheck_cases: list = [None]
    compile_backends = ("cpu", "reference")
    #: hypothesis examples of the property test (keep the suite fast)
    property_examples = 12
    #: the case run in float16 / bfloat16 (None: the first of ``cases``); its dtype is replaced
    half_case = None
    #: the bad calls of the public function: bad(call, error, match), call(*bad_input_args())
    bad_inputs: list = []
    #: direct op calls the C++ entry points must reject: bad(call, error, match), call()
    raw_bad_inputs: list = []

    # ---- what an op supplies ------------------------------------------------------------
    def make_inputs(self, case, device):
        raise NotImplementedError

    def call(self, *inputs):
        raise NotImplementedError

    def reference(self, *inputs):
        with busseg_ops.use_backend("reference"):
            return self.call(*inputs)

    def check_reference(self, case, inputs, expected) -> None:
        """Extra assertions on the reference output of a case (e.g. against an oracle)."""

    def grad_outputs(self, out) -> list[torch.Tensor]:
        """The outputs that carry a gradient (default: every floating output requiring grad)."""
        return [t for t in tensors_in(out) if t.is_floating_point() and t.requires_grad]

    def tolerance(self, dtype) -> dict:
        return tolerance(dtype)

    def case_tolerance(self, case, dtype) -> dict:
        """The outputs' tolerance for one case of compare_backends (an op whose rounding error grows
        with its inputs' size widens it there)."""
        return self.tolerance(dtype)

    def grad_tolerance(self, dtype, expected: torch.Tensor) -> dict:
        return tolerance(dtype)

    def runs_case(self, backend: str, device: str, case) -> bool:
        """Whether ``backend`` runs ``case`` on ``device`` (the Triton interpreter is slow: a spread)."""
        return True

    def variants(self, backend: str):
        """(label, context manager) settings under which a backend is compared (default: as is)."""
        return [("", contextlib.nullcontext())]

    def gradcheck_params(self) -> list:
        """(backend, case) pairs gradcheck runs (default: every gradcheck backend the op has, for
        every gradcheck case)."""
        return [(b, c) for b in self.gradcheck_backends if b in self.op.backends for c in self.gradcheck_cases]

    def gradcheck_inputs(self, case, backend):
        """(fn, float64 tensors) for torch.autograd.gradcheck, or None."""
        return None

    def compile_inputs(self):
        """(fn, inputs) to run eagerly and under torch.compile(fullgraph=True), or None."""
        return None

    def compile_expected(self, fn, inputs):
        """What the compiled fn must return (default: fn run eagerly)."""
        return fn(*inputs)

    def nan_inputs(self):
        """Inputs with a NaN (for ``call``), or None; ``check_nan(out, inputs)`` asserts the outcome."""
        return None

    def check_nan(self, out, inputs) -> None:
        raise NotImplementedError

    def layout_inputs(self):
        """Inputs (for ``call``) compared in contiguous, channels-last and strided layouts, or None."""
        return None

    def bad_input_args(self):
        return ()

    def raw_samples(self) -> list[RawSample]:
        """Valid direct calls of the op's native forward and backward (CPU)."""
        return []

    def triton_opcheck_samples(self) -> list[RawSample]:
        """Direct calls of the Triton ops for opcheck (default: the native forward's)."""
        return [s for s in self.raw_samples() if s.op == self.op.name][:1]

    # ---- the contract -----------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc):
        def ids(values):
            return [str(v).replace(" ", "") for v in values]

        on = devices()
        half_cases = [
            (d, b, dtype)
            for d in on
            for b in self.backends(d) + ["reference"]
            for dtype in HALF_DTYPES
            # the Triton interpreter runs numpy, which has no bfloat16 (GPUs run the Triton kernels)
            if not (d == "cpu" and b == "triton" and dtype == torch.bfloat16)
        ]
        params = {
            "case": self.cases,
            "device": on,
            "gradcheck": [(b, c) for b, c in self.gradcheck_params() if b in busseg_ops.available_backends("cpu")],
            "compile_target": [
                (d, b)
                for d in on
                for b in (self.compile_backends if d == "cpu" else ("cuda", "triton"))
                if b in self.op.backends and b in busseg_ops.available_backends(d)
            ],
            "any_backend": [b for b in self.op.backends if b in busseg_ops.available_backends("cpu")],
            "layout_backend": self.backends("cpu"),
            "half": half_cases,
            "half_dtype": list(HALF_DTYPES),
            "autocast_backend": [b for b in self.op.backends if b in ("cpu", "reference")],
            "bad_input": self.bad_inputs,
            "raw_bad_input": self.raw_bad_inputs,
        }
        for name, values in params.items():
            if name not in metafunc.fixturenames:
                continue
            if not values:
                skip = pytest.mark.skip(reason=f"{self.op.name}: no {name} here")
                metafunc.parametrize(name, [pytest.param(None, marks=skip)], ids=["none"])
            elif name in ("bad_input", "raw_bad_input"):
                metafunc.parametrize(name, values)
            else:
                metafunc.parametrize(name, values, ids=ids(values))

    def backends(self, device: str) -> list[str]:
        """The op's non-reference backends that run on ``device`` here."""
        return [b for b in self.op.backends if b != "reference" and b in busseg_ops.available_backends(device)]

    def run(self, backend, *inputs):
        with busseg_ops.use_backend(backend):
            return self.call(*inputs)

    def assert_same(self, got, expected, msg: str, exact: bool = False, case=None) -> None:
        got_t, exp_t = tensors_in(got), tensors_in(expected)
        assert len(got_t) == len(exp_t), f"{msg}: {len(got_t)} outputs, expected {len(exp_t)}"
        for i, (g, e) in enumerate(zip(got_t, exp_t)):
            if exact or self.exact or not e.is_floating_point():
                assert g.dtype == e.dtype and torch.equal(g, e), f"{msg}: output {i} differs"
            else:
                tol = self.tolerance(e.dtype) if case is None else self.case_tolerance(case, e.dtype)
                torch.testing.assert_close(g, e, **tol, msg=f"{msg}: output {i}")

    def gradients(self, out, inputs, cotangents):
        leaves = [t for t in tensors_in(inputs) if t.requires_grad]
        outs = self.grad_outputs(out)
        if not leaves or not outs:
            return []
        return torch.autograd.grad(outs, leaves, cotangents)

    def compare_backends(self, case, device, backends) -> None:
        inputs = self.make_inputs(case, device)
        expected = self.reference(*inputs)
        self.check_reference(case, inputs, expected)
        cotangents = [torch.randn_like(t) for t in self.grad_outputs(expected)]
        expected_grads = self.gradients(expected, inputs, cotangents)
        for backend in backends:
            if not self.runs_case(backend, device, case):
                continue
            for label, setting in self.variants(backend):
                with setting:
                    got = self.run(backend, *inputs)
                msg = f"{backend}{label}"
                self.assert_same(got, expected, msg, case=case)
                grads = self.gradients(got, inputs, cotangents)
                assert len(grads) == len(expected_grads), msg
                for i, (g, e) in enumerate(zip(grads, expected_grads)):
                    torch.testing.assert_close(g, e, **self.grad_tolerance(e.dtype, e), msg=f"{msg} grad {i}")

    def test_backends_match_reference(self, case, device):
        self.compare_backends(case, device, self.backends(device))

    def test_gradcheck(self, gradcheck):
        backend, case = gradcheck
        spec = self.gradcheck_inputs(case, backend)
        if spec is None:
            pytest.skip("no gradient")
        fn, tensors = spec
        with busseg_ops.use_backend(backend):
            assert torch.autograd.gradcheck(fn, tensors)

    def test_opcheck(self):
        samples = self.raw_samples()
        if not samples:
            pytest.skip("no native op")
        for s in samples:
            torch.library.opcheck(getattr(torch.ops.busseg, s.op), s.args)
        if "triton" in self.op.backends and "triton" in busseg_ops.available_backends("cpu"):
            # Fake-tensor tracing of a triton_op needs a GPU; the interpreter runs the kernel instead.
            for s in self.triton_opcheck_samples():
                torch.library.opcheck(
                    getattr(torch.ops.busseg_triton, s.op),
                    s.args,
                    test_utils=("test_schema", "test_autograd_registration"),
                )

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_opcheck_cuda(self):
        for s in self.raw_samples():
            args = map_tensors(lambda t: t.cuda(), s.args)
            torch.library.opcheck(getattr(torch.ops.busseg, s.op), args)
            if "triton" in self.op.backends and hasattr(torch.ops.busseg_triton, s.op):
                torch.library.opcheck(getattr(torch.ops.busseg_triton, s.op), args)

    def test_compile(self, compile_target):
        device, backend = compile_target
        spec = self.compile_inputs()
        if spec is None:
            pytest.skip("no compile check")
        fn, inputs = spec
        inputs = map_tensors(lambda t: t.to(device).detach().requires_grad_(t.requires_grad), inputs)
        leaves = [t for t in tensors_in(inputs) if t.requires_grad]
        with busseg_ops.use_backend(backend):
            expected = self.compile_expected(fn, inputs)
            g_expected = torch.autograd.grad(expected, leaves) if leaves else ()
            got = torch.compile(fn, fullgraph=True)(*inputs)
            grads = torch.autograd.grad(got, leaves) if leaves else ()
        self.assert_same(got, expected, f"compiled {backend}")
        for g, e in zip(grads, g_expected):
            torch.testing.assert_close(g, e)

    def test_nan_propagates(self, any_backend):
        inputs = self.nan_inputs()
        if inputs is None:
            pytest.skip("no NaN check")
        self.check_nan(self.run(any_backend, *inputs), inputs)

    def test_layouts(self, layout_backend):
        inputs = self.layout_inputs()
        if inputs is None:
            pytest.skip("no layout check")
        expected = self.run(layout_backend, *inputs)
        positions = [i for i, t in enumerate(tensors_in(inputs)) if t.dim() >= 2]
        for name, layout in (("channels_last", channels_last), ("strided", strided)):
            for i in positions:  # one input at a time in the layout
                got = self.run(layout_backend, *map_nth_tensor(layout, inputs, i))
                self.assert_same(got, expected, f"{layout_backend} {name} input {i}", name in self.layout_exact)

    def test_bad_inputs(self, bad_input):
        call, error, match = bad_input
        with pytest.raises(error, match=match):
            call(*self.bad_input_args())

    def test_raw_op_rejects(self, raw_bad_input):
        call, error, match = raw_bad_input
        with pytest.raises(error, match=match):
            call()

    # ---- float16 and bfloat16 ----------------------------------------------------------------
    def half_tolerance(self, dtype, expected: torch.Tensor) -> dict:
        """Tolerance of a float16 / bfloat16 result against the float32 reference: the dtype's, the
        absolute part relative to the result's size (the inputs are the same rounded values, so
        the differences are the rounding of the outputs and of what is kept for backward)."""
        tol = tolerance(dtype)
        return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, expected.abs().max().item()))

    def assert_close_to_float32(self, got, narrow, expected, wide, dtype, msg: str) -> None:
        """Outputs (in ``dtype``) and gradients (one cotangent for both) of a narrow call against
        the float32 call ``expected`` on ``wide``, the same values widened."""
        got_t, exp_t = tensors_in(got), tensors_in(expected)
        assert len(got_t) == len(exp_t), msg
        for i, (g, e) in enumerate(zip(got_t, exp_t)):
            if not e.is_floating_point():
                assert torch.equal(g, e), f"{msg}: output {i} differs"
                continue
            assert g.dtype == dtype, f"{msg}: output {i} is {g.dtype}"
            e = e.to(torch.float32)
            torch.testing.assert_close(g.float(), e, **self.half_tolerance(dtype, e), msg=f"{msg}: output {i}")
        cotangents = [torch.randn_like(t, dtype=torch.float32) for t in self.grad_outputs(expected)]
        grads = self.gradients(got, narrow, [c.to(dtype) for c in cotangents])
        expected_grads = self.gradients(expected, wide, cotangents)
        assert len(grads) == len(expected_grads), msg
        leaves = [t for t in tensors_in(narrow) if t.requires_grad]
        for i, (g, e, leaf) in enumerate(zip(grads, expected_grads, leaves)):
            assert g.dtype == leaf.dtype, f"{msg}: grad {i} is {g.dtype}"
            coarsest = leaf.dtype if leaf.dtype in HALF_DTYPES else dtype  # computed or stored narrow
            torch.testing.assert_close(g.float(), e, **self.half_tolerance(coarsest, e), msg=f"{msg} grad {i}")

    def test_half_precision(self, half):
        """float16 / bfloat16 inputs against the float32 reference on the same rounded values (the
        Triton kernels under the interpreter in float16 only)."""
        device, backend, half_dtype = half
        inputs = self.make_inputs(self.half_case or self.cases[0], device)
        narrow = map_tensors(lambda t: floating_as(t, half_dtype), inputs)
        wide = map_tensors(lambda t: floating_as(t, torch.float32), narrow)
        got = self.run(backend, *narrow)
        self.assert_close_to_float32(got, narrow, self.reference(*wide), wide, half_dtype, f"{backend} {half_dtype}")

    def test_opcheck_half(self, half_dtype):
        samples = self.raw_samples()
        if not samples:
            pytest.skip("no native op")
        for s in samples:
            torch.library.opcheck(
                getattr(torch.ops.busseg, s.op), map_tensors(lambda t: floating_as(t, half_dtype), s.args)
            )

    def test_autocast(self, autocast_backend):
        """Under torch.autocast("cpu", bfloat16) the op follows ``Op.autocast``, whatever mix of
        dtypes comes in (here the first floating input in bfloat16, the others float32): all cast
        to float32 or to bfloat16, or (None) run as they are; gradients reach each input in its
        own dtype."""
        inputs = self.make_inputs(self.half_case or self.cases[0], "cpu")
        first = next(i for i, t in enumerate(tensors_in(inputs)) if t.is_floating_point())
        mixed = map_tensors(lambda t: floating_as(t, torch.float32), inputs)
        mixed = map_nth_tensor(lambda t: floating_as(t, torch.bfloat16), mixed, first)
        with torch.autocast("cpu", torch.bfloat16):
            got = self.run(autocast_backend, *mixed)
        if self.op.autocast is None:  # as without autocast
            self.assert_same(got, self.run(autocast_backend, *mixed), f"{autocast_backend} under autocast", exact=True)
            return
        dtype = torch.float32 if self.op.autocast == "float32" else torch.bfloat16
        wide = map_tensors(lambda t: floating_as(floating_as(t, dtype), torch.float32), mixed)
        self.assert_close_to_float32(got, mixed, self.reference(*wide), wide, dtype, f"{autocast_backend} autocast")

    def test_compile_autocast(self):
        """The op's native backend compiled (fullgraph, AOT autograd: the fake kernels, the autocast
        rule and autograd traced) on bfloat16 inputs under autocast equals the eager call."""
        spec = self.compile_inputs()
        if spec is None or "cpu" not in self.op.backends:
            pytest.skip("no compile check")
        fn, inputs = spec
        inputs = map_tensors(lambda t: floating_as(t, torch.bfloat16), inputs)
        leaves = [t for t in tensors_in(inputs) if t.requires_grad]
        with busseg_ops.use_backend("cpu"), torch.autocast("cpu", torch.bfloat16):
            expected = fn(*inputs)
            g_expected = torch.autograd.grad(expected, leaves) if leaves else ()
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
            grads = torch.autograd.grad(got, leaves) if leaves else ()
        self.assert_same(got, expected, "compiled under autocast")
        for g, e in zip(grads, g_expected):
            assert g.dtype == e.dtype
            torch.testing.assert_close(g, e)

    def property_case(self):
        """A hypothesis strategy of cases for make_inputs, or None."""
        return None

    def test_property_backends_match_reference(self):
        strategy = self.property_case()
        native = [b for b in self.backends("cpu") if b != "triton"]  # the interpreter is too slow
        if strategy is None or not native:
            pytest.skip("no property test")

        @settings(
            max_examples=self.property_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy, st.integers(0, 2**31 - 1))
        def check(case, seed):
            torch.manual_seed(seed)  # the inputs of an example are a function of it: replayable
            self.compare_backends(case, "cpu", native)

        check()
