"""Streaming memory contrastive loss (SPEC §6): every backend against the materialising reference,
gradients, skipped classes, compile/opcheck, and the O(N + N⁻) memory bound."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import backends, devices, tolerance

import busseg_ops
from busseg_ops import memory_contrastive_loss as mcl


def make(N, M, D, K=2, device="cpu", dtype=torch.float32, neg_grad=False):
    anchors = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    ya = torch.randint(0, K, (N,), device=device)
    negatives = torch.randn(M, D, device=device, dtype=dtype, requires_grad=neg_grad)
    yn = torch.randint(0, K, (M,), device=device)
    positives = torch.randn(K, D, device=device, dtype=dtype)
    return anchors, ya, negatives, yn, positives


def naive(anchors, ya, negatives, yn, positives, tau):
    """Eq. 15 written per anchor with Python loops: an oracle independent of the reference."""
    classes, total = 0, 0.0
    for c in range(positives.shape[0]):
        idx = (ya == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        classes += 1
        terms = []
        for i in idx:
            z = anchors[i]
            pos = F.cosine_similarity(z, positives[c], 0, eps=1e-12) / tau
            neg = F.cosine_similarity(z[None], negatives[yn != c], 1, eps=1e-12) / tau
            terms.append(-(pos - torch.logsumexp(torch.cat([pos[None], neg]), 0)))
        total = total + torch.stack(terms).mean()
    return total / classes


def test_reference_matches_per_anchor_formula():
    a, ya, n, yn, p = make(7, 9, 5, K=3, dtype=torch.float64)
    with busseg_ops.use_backend("reference"):
        loss = mcl(a, ya, n, yn, p, 0.3)
    torch.testing.assert_close(loss, naive(a, ya, n, yn, p, 0.3))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N,M,D,K", [(5, 7, 3, 2), (37, 70, 16, 2), (64, 33, 20, 3), (1, 1, 8, 2)])
@pytest.mark.parametrize("neg_grad", [False, True])
def test_backends_match_reference(device, N, M, D, K, neg_grad):
    a, ya, n, yn, p = make(N, M, D, K, device, neg_grad=neg_grad)
    inputs = (a, n) if neg_grad else (a,)
    with busseg_ops.use_backend("reference"):
        ref = mcl(a, ya, n, yn, p, 0.5)
    ref_g = torch.autograd.grad(ref, inputs)
    for backend in backends(device):
        with busseg_ops.use_backend(backend):
            loss = mcl(a, ya, n, yn, p, 0.5)
        grads = torch.autograd.grad(loss, inputs)
        torch.testing.assert_close(loss, ref, **tolerance(torch.float32), msg=backend)
        for g, r in zip(grads, ref_g):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=f"{backend} grad")


def test_cpu_tiles_cover_more_than_one_block():
    # 1024-row tiles: N, N⁻ > 1024 exercise the online LSE across blocks and partial tiles.
    a, ya, n, yn, p = make(1500, 2100, 8, neg_grad=True)
    with busseg_ops.use_backend("reference"):
        ref = mcl(a, ya, n, yn, p, 0.1)
        ref_g = torch.autograd.grad(ref, (a, n))
    with busseg_ops.use_backend("cpu"):
        loss = mcl(a, ya, n, yn, p, 0.1)
        grads = torch.autograd.grad(loss, (a, n))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    a, ya, n, yn, p = make(6, 8, 4, K=3, dtype=torch.float64, neg_grad=True)
    ya[0] = 7  # an ignored anchor label
    with busseg_ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, y: mcl(x, ya, y, yn, p, 0.5), (a, n))


def test_positives_never_get_a_gradient_and_detached_negatives_none():
    a, ya, n, yn, p = make(6, 8, 4)
    p.requires_grad_()
    loss = mcl(a, ya, n, yn, p)
    loss.backward()
    assert p.grad is None and n.grad is None and a.grad is not None and a.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_class_without_anchor_or_positive_is_skipped(backend):
    a, ya, n, yn, p = make(10, 12, 4, K=3, dtype=torch.float64)
    ya[:] = torch.arange(10) % 2  # class 2 has no anchor
    with busseg_ops.use_backend(backend):
        full = mcl(a, ya, n, yn, p)
        # class 1 without positive: only class 0 counts
        only0 = mcl(a, ya, n, yn, [p[0], None, p[2]])
    keep = ya == 0
    torch.testing.assert_close(full, naive(a, ya, n, yn, p, 0.5))
    torch.testing.assert_close(only0, naive(a[keep], ya[keep], n, yn, p, 0.5))


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_all_empty_is_a_zero_loss_that_backpropagates(backend):
    a, ya, n, yn, p = make(4, 5, 3)
    with busseg_ops.use_backend(backend):
        none_left = mcl(a, ya, n, yn, [None, None])
        no_anchor = mcl(a[:0], ya[:0], n, yn, p)
        no_rows = mcl(a[:0], ya[:0], n[:0], yn[:0], p)
    for loss in (none_left, no_anchor, no_rows):
        assert loss.item() == 0 and loss.requires_grad
    (g,) = torch.autograd.grad(none_left, a)
    assert torch.equal(g, torch.zeros_like(a))
    no_rows.backward()


def test_negatives_without_other_classes_reduce_to_the_positive_term():
    a, ya, n, yn, p = make(5, 6, 4)
    ya[:] = 0
    yn[:] = 0  # no negative of another class: every ℓ = log(e^pos / e^pos) = 0
    torch.testing.assert_close(mcl(a, ya, n, yn, p), torch.tensor(0.0))


def test_opcheck():
    a, ya, n, yn, p = make(9, 11, 5, K=3, dtype=torch.float64, neg_grad=True)
    has = torch.tensor([True, False, True])
    args = (a, ya, n, yn, p, has, 0.5)
    torch.library.opcheck(torch.ops.busseg.memory_contrastive_forward, args)
    _, lse = torch.ops.busseg.memory_contrastive_forward(*args)
    for need in (True, False):
        torch.library.opcheck(
            torch.ops.busseg.memory_contrastive_backward,
            (torch.tensor(1.0, dtype=torch.float64), a.detach(), ya, n.detach(), yn, p, has, lse, 0.5, need),
        )
    if "triton" in busseg_ops.available_backends("cpu"):
        torch.library.opcheck(
            torch.ops.busseg.memory_contrastive_forward_triton,
            args,
            test_utils=("test_schema", "test_autograd_registration"),
        )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    a, ya, n, yn, p = make(20, 30, 8, neg_grad=True)
    with busseg_ops.use_backend(backend):
        expected = mcl(a, ya, n, yn, p, 0.4)
        g_expected = torch.autograd.grad(expected, (a, n))
        fn = torch.compile(lambda x, y: mcl(x, ya, y, yn, p, 0.4), fullgraph=True)
        loss = fn(a, n)
        grads = torch.autograd.grad(loss, (a, n))
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, g_expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", backends("cpu") + ["reference"])
def test_nan_propagates(backend):
    a, ya, n, yn, p = make(4, 5, 3)
    ya[:] = 0
    yn[:] = 1
    a.data[0, 0] = float("nan")
    with busseg_ops.use_backend(backend):
        assert mcl(a, ya, n, yn, p).isnan()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda a, ya, n, yn, p: mcl(a[0], ya, n, yn, p), ValueError, "anchors must have 2 dims"),
        (lambda a, ya, n, yn, p: mcl(a, ya[:2], n, yn, p), ValueError, "anchor_labels must be"),
        (lambda a, ya, n, yn, p: mcl(a, ya, n[:, :2], yn, p), ValueError, "anchors and negatives must share D"),
        (lambda a, ya, n, yn, p: mcl(a, ya, n, yn[:1], p), ValueError, "negative_labels must be"),
        (lambda a, ya, n, yn, p: mcl(a, ya.int(), n, yn, p), TypeError, "anchor_labels must be int64"),
        (
            lambda a, ya, n, yn, p: mcl(a, ya, n.double(), yn, p),
            TypeError,
            "anchors and negatives must have the same dtype",
        ),
        (lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p[:, :2]), ValueError, "positives must be"),
        (lambda a, ya, n, yn, p: mcl(a, ya, n, yn, p, temperature=0), ValueError, "temperature"),
        (lambda a, ya, n, yn, p: mcl(a.long(), ya, n, yn, p), TypeError, "anchors must be one of"),
        (lambda a, ya, n, yn, p: mcl(a, ya, n, yn, "p"), TypeError, "positives must be"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(*make(4, 5, 3))


def test_direct_op_call_is_checked_in_cpp():
    a, ya, n, yn, p = make(4, 5, 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        torch.ops.busseg.memory_contrastive_forward(a, ya, n, yn, p, torch.ones(2, dtype=torch.bool), 0.0)


_MEMORY_CHILD = """
import torch, busseg_ops
torch.set_num_threads(2)
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024
N = D = None
g = torch.Generator().manual_seed(0)
a = torch.randn(32768, 64, generator=g).requires_grad_()
n = torch.randn(32768, 64, generator=g)
ya = torch.randint(0, 2, (32768,), generator=g)
yn = torch.randint(0, 2, (32768,), generator=g)
p = torch.randn(2, 64, generator=g)
with busseg_ops.use_backend('cpu'):
    small = busseg_ops.memory_contrastive_loss(a[:64], ya[:64], n[:64], yn[:64], p)
    small.backward()  # warm the allocator and the BLAS threads
    a.grad = None
    try:
        open('/proc/self/clear_refs', 'w').write('5')
    except OSError:
        pass
    base, before = rss(), hwm()
    loss = busseg_ops.memory_contrastive_loss(a, ya, n, yn, p)
    loss.backward()
print(hwm() - (base if before <= base + 1 else before), float(loss), float(a.grad.abs().sum()))
"""


def test_memory_stays_linear_at_32k_by_32k():
    """N = N⁻ = 32768, D = 64 forward+backward on `cpu` under 256 MiB extra peak (the
    materialised matrix alone would be 4 GiB), in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEMORY_CHILD)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak, loss, grad = map(float, out.stdout.split())
    assert 0 < loss < 100 and grad > 0
    assert peak < 256, f"peak extra {peak:.0f} MiB"
