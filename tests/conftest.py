"""Shared test set-up. Without a GPU, Triton kernels run on the CPU through its interpreter; the
variable must be set before triton is first imported. torch.compile gets a cache of its own
per session: the shared one does not key on custom ops' fake kernels, so graphs cached by
another checkout (or an older build) could be replayed against this one."""

import contextlib
import os
import shutil
import tempfile
import zlib

_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="busseg-inductor-")

if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import busseg_ops

# Under pytest-xdist each worker gets its share of the cores: torch's default, every core in every
# worker, oversubscribes them and OpenMP threads spin waiting on each other (the BUSI run took twice
# as long beside the packaging build; the suite 14 % more CPU time). Thread-count tests set their own.
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with ``n`` torch threads, then with as many as before."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# The tests use torch.ops.busseg_triton directly; busseg_ops registers it on first dispatch alone.
busseg_ops.backends.load_triton()


def backends(device: str = "cpu", exclude: tuple[str, ...] = ()) -> list[str]:
    """Non-reference backends that run on ``device`` here."""
    return [b for b in busseg_ops.available_backends(device) if b != "reference" and b not in exclude]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def triton_device() -> str:
    """Where the Triton kernels run here: the GPU, else the CPU under the interpreter; skips where neither."""
    for device in reversed(devices()):
        if "triton" in busseg_ops.available_backends(device):
            return device
    pytest.skip("triton is not available here")


def tolerance(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.float16: dict(rtol=2e-2, atol=2e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    }[dtype]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh inputs, replayable failures."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort). `make test`'s `--dist worksteal` gives each worker half
    of the list and lets an idle one take the far end of the other's: one worker starts on the slow
    tests (the packaging module's tests share one build) and none ends the run alone on one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
