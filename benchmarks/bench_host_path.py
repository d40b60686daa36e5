"""The host path of an op call (issue 27, item 5) on tiny tensors, where the kernel costs next to
nothing: on a GPU a 20 µs kernel behind a 100 µs host path leaves the GPU idle, so an op call should
cost about what the comparable torch call costs (ARP against ``F.conv2d``, the CRA loss against
``F.kl_div``). One thread. ``test_ratio`` takes each side's best of many short alternating loops:
on a loaded machine that is each side's unloaded cost, under the same load (docs/benchmarks.md)."""

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import busseg_ops

THREADS = 1
#: calls per timed loop, loops per side (the best loop counts)
CALLS, LOOPS = 100, 200


def _arp_inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 4, 5, 5, generator=g).to(DEVICE).requires_grad_(requires_grad)
    value = torch.randn(1, 2, 5, 5, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return feat, value


def _conv_inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 5, generator=g).to(DEVICE).requires_grad_(requires_grad)
    weight = torch.randn(4, 4, 3, 3, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return x, weight


def _cra_inputs():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 4, 5, 5, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    proxies = [torch.randn(1, 3, 4, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    return feats, proxies


def _kl_inputs():
    g = torch.Generator().manual_seed(0)
    log_p = torch.randn(1, 25, 3, generator=g).log_softmax(2).to(DEVICE).requires_grad_()
    q = torch.randn(1, 25, 3, generator=g).softmax(2).to(DEVICE).requires_grad_()
    return log_p, q


def _with_backward(fn, leaves):
    """``fn`` followed by the gradients of its output for all ``leaves`` (a cotangent of ones)."""
    cotangent = torch.ones_like(fn())

    def step():
        return torch.autograd.grad(fn(), leaves, cotangent)

    return step


def calls():
    """{(pair, side): zero-argument call}, the sides of each pair measured on the same footing."""
    feat, value = _arp_inputs(False)
    x, weight = _conv_inputs(False)
    feat_g, value_g = _arp_inputs(True)
    x_g, weight_g = _conv_inputs(True)
    feats, proxies = _cra_inputs()
    log_p, q = _kl_inputs()
    arp = busseg_ops.adjacent_relation_propagation
    return {
        ("forward", "arp"): lambda: arp(feat, value),
        ("forward", "baseline_conv2d"): lambda: F.conv2d(x, weight, padding=1),
        ("fwd+bwd", "arp"): _with_backward(lambda: arp(feat_g, value_g), [feat_g, value_g]),
        ("fwd+bwd", "baseline_conv2d"): _with_backward(lambda: F.conv2d(x_g, weight_g, padding=1), [x_g, weight_g]),
        ("cra fwd+bwd", "cra_loss"): _with_backward(
            lambda: busseg_ops.cross_layer_alignment_loss(feats, proxies), feats + proxies
        ),
        ("cra fwd+bwd", "baseline_kl_div"): _with_backward(
            lambda: F.kl_div(log_p, q, reduction="batchmean"), [log_p, q]
        ),
    }


#: (ours, the torch call) of each pair
PAIRS = {
    "forward": ("arp", "baseline_conv2d"),
    "fwd+bwd": ("arp", "baseline_conv2d"),
    "cra fwd+bwd": ("cra_loss", "baseline_kl_div"),
}
TARGETS = {"forward": 1.5, "fwd+bwd": 1.5}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


def _loop_us(fn) -> float:
    """µs per call of one loop of CALLS calls."""
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e6


@pytest.mark.parametrize("pair", list(PAIRS))
def test_ratio(pair, capsys):
    """Ours over the torch call, the best of LOOPS alternating loops of each."""
    ours, theirs = (calls()[pair, side] for side in PAIRS[pair])
    ours(), theirs()  # warm-up: first-call lookups and allocations
    best_ours = best_theirs = float("inf")
    for _ in range(LOOPS):
        best_ours = min(best_ours, _loop_us(ours))
        best_theirs = min(best_theirs, _loop_us(theirs))
    ratio = best_ours / best_theirs
    target = f" (target ≤ {TARGETS[pair]}×)" if pair in TARGETS else ""
    line = (
        f"host path {pair}: {PAIRS[pair][0]} {best_ours:.1f} µs / {PAIRS[pair][1]} {best_theirs:.1f} µs "
        f"= {ratio:.2f}×{target}, {THREADS} thread, best of {LOOPS} loops of {CALLS} calls"
    )
    with capsys.disabled():
        print("\n" + line)


def _time_call(benchmark, pair, side):
    benchmark.group = f"host path: {pair}"
    fn = calls()[pair, side]
    fn()
    benchmark.pedantic(fn, rounds=LOOPS, iterations=CALLS, warmup_rounds=1)


@pytest.mark.parametrize("side", PAIRS["forward"])
def test_forward(benchmark, side):
    _time_call(benchmark, "forward", side)


@pytest.mark.parametrize("side", PAIRS["fwd+bwd"])
def test_forward_backward(benchmark, side):
    _time_call(benchmark, "fwd+bwd", side)


@pytest.mark.parametrize("side", PAIRS["cra fwd+bwd"])
def test_cra_forward_backward(benchmark, side):
    _time_call(benchmark, "cra fwd+bwd", side)
