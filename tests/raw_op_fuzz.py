"""Child process of tests/test_raw_op_fuzz.py: calls raw ops with bad arguments and reports how
each call ended, one JSON line per call (flushed before the next call, so a crash names its call).

    python raw_op_fuzz.py SAMPLES_FILE

SAMPLES_FILE (torch.save, loaded with weights_only=True) holds a list of
{"namespace", "op", "args", "free"}: valid calls, and what may change in them and stay valid.
"""

from __future__ import annotations

import json
import sys

import torch

HUGE = (2**62 + 1, 2**63 - 1)


def _tensor_mutations(t: torch.Tensor, free: set, i: int, alone: bool):
    if (i, "rank") not in free:
        yield "rank+1", lambda t: t.unsqueeze(0)
        if t.dim() >= 1 and t.shape[-1] > 0:
            yield "rank-1", lambda t: t.select(-1, 0)
    for d in range(t.dim()):
        if (i, "dim", d) not in free and t.shape[d] > 0:
            yield f"dim{d}+1", lambda t, d=d: torch.cat([t, t.narrow(d, 0, 1)], d)
    if (i, "dtype") not in free:
        other = torch.int32 if t.is_floating_point() else torch.float32
        yield f"dtype {other}", lambda t, other=other: t.to(other)
    if not alone:  # a call on meta tensors only is a valid shape computation
        yield "meta", lambda t: t.to("meta")


def mutations(args: tuple, free: set):
    """(description, bad args) for every mutation of ``args`` that ``free`` does not allow."""
    alone = len(_tensors(args)) == 1
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            for what, fn in _tensor_mutations(a, free, i, alone):
                yield f"arg {i} {what}", args[:i] + (fn(a),) + args[i + 1 :]
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            yield f"arg {i} empty list", args[:i] + ([],) + args[i + 1 :]
            for what, fn in _tensor_mutations(a[0], free, i, alone):
                yield f"arg {i}[0] {what}", args[:i] + ([fn(a[0]), *a[1:]],) + args[i + 1 :]
        elif isinstance(a, int) and not isinstance(a, bool):
            bad = (-1,) + (() if (i, "zero") in free else (0,)) + (() if (i, "huge") in free else HUGE)
            for v in bad:
                yield f"arg {i} = {v}", args[:i] + (v,) + args[i + 1 :]


def main(path: str) -> None:
    import busseg_ops

    busseg_ops.backends.load_triton()  # the busseg_triton ops too (else registered on first dispatch)

    for sample in torch.load(path, weights_only=True):
        op = getattr(getattr(torch.ops, sample["namespace"]), sample["op"])
        name = f"{sample['namespace']}::{sample['op']}"
        args = tuple(sample["args"])
        expected = op(*args)  # the valid call runs
        for what, bad_args in mutations(args, set(map(tuple, sample["free"]))):
            print(json.dumps({"op": name, "call": what, "status": "calling"}), flush=True)
            try:
                op(*bad_args)
                status, error = "returned", ""
            except Exception as err:  # noqa: BLE001  (the parent judges the exception's type)
                status, error = type(err).__name__, str(err).splitlines()[0][:200]
            print(json.dumps({"op": name, "call": what, "status": status, "error": error}), flush=True)
        again = op(*args)  # nothing left broken behind
        same = all(
            torch.equal(a, b) or (a.is_floating_point() and bool(torch.allclose(a, b, equal_nan=True)))
            for a, b in zip(_tensors(again), _tensors(expected))
        )
        print(json.dumps({"op": name, "call": "valid again", "status": "same" if same else "differs"}), flush=True)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


if __name__ == "__main__":
    main(sys.argv[1])
