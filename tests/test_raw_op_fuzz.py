"""Every raw op, torch.ops.busseg.* and torch.ops.busseg_triton.*, called directly with mismatched
shapes, ranks, dtypes, devices and out-of-range ints, in a subprocess: no signal, no garbage (no
bad call returns), one clean error per bad call (c10's RuntimeError, ValueError, TypeError or
IndexError, raised before any memory is touched), and the valid call still right afterwards."""

import json
import os
import subprocess
import sys

import test_adaptive_patch_cutmix
import test_adjacent_relation_propagation
import test_cross_layer_alignment_loss
import test_greedy_proxy_sampling
import test_memory_contrastive_loss
import test_patch_entropy_hardness
import torch
from op_contract import map_tensors

import busseg_ops

# (modules, not classes: a class imported here would be collected and run twice)
CONTRACTS = [
    test_adjacent_relation_propagation.TestAdjacentRelationPropagation,
    test_greedy_proxy_sampling.TestGreedyProxySampling,
    test_cross_layer_alignment_loss.TestCrossLayerAlignmentLoss,
    test_patch_entropy_hardness.TestPatchEntropyHardness,
    test_adaptive_patch_cutmix.TestAdaptivePatchCutmix,
    test_adaptive_patch_cutmix.TestCutmixPatchMask,
    test_memory_contrastive_loss.TestMemoryContrastiveLoss,
]
CLEAN_ERRORS = {"RuntimeError", "ValueError", "TypeError", "IndexError"}


def registered_ops(namespace: str) -> set[str]:
    prefix = f"{namespace}::"
    return {name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)}


def test_every_raw_op_rejects_bad_calls_cleanly(tmp_path):
    samples, covered = [], set()
    triton = "triton" in busseg_ops.available_backends("cpu")
    for contract in CONTRACTS:
        instance = contract()
        for s in instance.raw_samples():
            namespaces = ["busseg"] + (["busseg_triton"] if triton and "triton" in contract.op.backends else [])
            for namespace in namespaces:
                args = map_tensors(lambda t: t.detach(), list(s.args))
                samples.append({"namespace": namespace, "op": s.op, "args": args, "free": sorted(s.free)})
                covered.add(f"{namespace}::{s.op}")
    expected = {f"busseg::{op}" for op in registered_ops("busseg")}
    if triton:
        expected |= {f"busseg_triton::{op}" for op in registered_ops("busseg_triton")}
    assert expected <= covered, f"raw ops without a fuzz sample: {sorted(expected - covered)}"
    path = tmp_path / "samples.pt"
    torch.save(samples, path)
    child = os.path.join(os.path.dirname(__file__), "raw_op_fuzz.py")
    out = subprocess.run([sys.executable, child, str(path)], capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    last = lines[-1] if lines else {}
    assert out.returncode == 0, (
        f"the child died (return code {out.returncode}) during {last.get('op')} {last.get('call')}:\n"
        f"{out.stderr[-3000:]}"
    )
    results = [r for r in lines if r["status"] != "calling"]
    bad = [r for r in results if r["call"] != "valid again" and r["status"] not in CLEAN_ERRORS]
    assert not bad, "bad calls that did not raise a clean error:\n" + "\n".join(map(str, bad))
    again = [r for r in results if r["call"] == "valid again"]
    assert len(again) == len(samples) and all(r["status"] == "same" for r in again), again
    assert len(results) - len(again) > 20 * len(samples)  # the mutations ran
