"""Wall time of one training step and the share spent inside busseg_ops (torch.profiler).

    .venv/bin/python benchmarks/train_step_profile.py [method] [size] [unet_base]

Every public busseg_ops function is wrapped in a record_function range for the forward; the
backward kernels of the custom ops appear as busseg::*backward events."""

import functools
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import busseg_ops
from busseg_ops.train import TrainConfig, Trainer


def wrap_ops():
    for name in busseg_ops.__all__:
        fn = getattr(busseg_ops, name)
        if callable(fn) and not isinstance(fn, type) and name not in ("use_backend", "available_backends"):

            @functools.wraps(fn)
            def wrapped(*a, _fn=fn, _name=name, **k):
                with record_function(f"busseg_ops.{_name}"):
                    return _fn(*a, **k)

            setattr(busseg_ops, name, wrapped)


def profile_steps(tr, lab, unl, ctx, steps=5):
    """Profiles `steps` training steps of Trainer `tr` (ops wrapped by wrap_ops): wall seconds per
    step, {busseg op: seconds per step} and the profiled CPU seconds per step."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tr.train_step(lab, unl, ctx)
    wall = (time.perf_counter() - t0) / steps
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / steps / 1e6
    ours = {
        e.key: e.cpu_time_total / steps / 1e6
        for e in ev
        if e.key.startswith("busseg_ops.") or (e.key.startswith("busseg::") and "backward" in e.key)
    }
    return wall, ours, total


def main(method="rabusseg", size=64, base=8, steps=5):
    wrap_ops()
    cfg = TrainConfig(
        method=method,
        synthetic_n=64,
        synthetic_size=size,
        crop=size,
        unet_base=base,
        proj_dim=32,
        rep_dim=16,
        num_proxies=16,
        warmup_epochs=0,
        epochs=1,
        out="runs/profile",
        quiet=True,
        gamma=0.5,
    )
    tr = Trainer(cfg)
    lab, unl = next(iter(tr._batches(0)))
    ctx = {"epoch": 0, "progress": 0.5, "warmup": False, "epochs": 1}
    for _ in range(2):
        tr.train_step(lab, unl, ctx)
    wall, ours, total = profile_steps(tr, lab, unl, ctx, steps)
    share = sum(ours.values())
    print(
        f"{method} {size}px U-Net base {base}, batch {cfg.batch_labeled}+{cfg.batch_unlabeled}, "
        f"{torch.get_num_threads()} threads: {wall * 1000:.0f} ms/step (profiled), busseg_ops "
        f"{share * 1000:.1f} ms = {100 * share / total:.1f}% of profiled CPU time"
    )
    for k, v in sorted(ours.items(), key=lambda kv: -kv[1]):
        print(f"  {k:45s} {v * 1000:8.2f} ms/step")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "rabusseg", int(a[1]) if len(a) > 1 else 64, int(a[2]) if len(a) > 2 else 8)
