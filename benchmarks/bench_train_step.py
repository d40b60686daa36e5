"""One training step at the default run's scale (128-px synthetic crops, U-Net base 16, batch
2 + 2, every loss on) of rabusseg and of phnet on the CPU: float32 against `--amp bf16`, in the
default memory format and with `--channels-last` (a group each: oneDNN's convolutions run faster
channels-last in both precisions), and the share of the step spent in busseg ops (torch.profiler
through benchmarks/train_step_profile.py; reported in the memory column as a percentage, marked
"not MiB")."""

import pytest
import torch
from train_step_profile import profile_steps, wrap_ops

from busseg_ops.train import TrainConfig, Trainer

AMP = {"baseline fp32": "off", "bf16": "bf16"}
CTX = {"epoch": 0, "progress": 0.5, "warmup": False, "epochs": 1}

wrap_ops()  # once per process: record_function ranges around the public ops


def time_step(benchmark, record_memory, out, method, impl, channels_last):
    benchmark.group = f"{method} train step 128 px" + (", channels-last" if channels_last else "")
    torch.manual_seed(0)
    cfg = TrainConfig(
        method=method, amp=AMP[impl], channels_last=channels_last, warmup_epochs=0, out=str(out), quiet=True
    )
    tr = Trainer(cfg)
    lab, unl = next(iter(tr._batches(0)))
    benchmark.pedantic(lambda: tr.train_step(lab, unl, CTX), rounds=5, warmup_rounds=2)
    _, ours, total = profile_steps(tr, lab, unl, CTX, steps=2)
    record_memory(benchmark.group, f"{impl}: busseg_ops share % (not MiB)", 100 * sum(ours.values()) / total)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("impl", list(AMP))
def test_rabusseg_step(benchmark, record_memory, tmp_path, impl, channels_last):
    time_step(benchmark, record_memory, tmp_path, "rabusseg", impl, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("impl", list(AMP))
def test_phnet_step(benchmark, record_memory, tmp_path, impl, channels_last):
    time_step(benchmark, record_memory, tmp_path, "phnet", impl, channels_last)


# Issue 30: the converged reproduction's step (batch 4 + 4, rep_dim 32, upstream dropout) with PH-Net's projector
# on the U-Net's full-resolution map (the baseline, the reproduction's setting), at upstream's stride 4, and
# suponly's step for the scale of the SSL methods' cost.
PROJECTOR = {"baseline phnet stride 1": ("phnet", 1), "phnet stride 4": ("phnet", 4), "suponly": ("suponly", 4)}


@pytest.mark.parametrize("impl", list(PROJECTOR))
def test_phnet_projector_stride(benchmark, tmp_path, impl):
    method, stride = PROJECTOR[impl]
    benchmark.group = "phnet train step, reproduction scale (128 px, batch 4 + 4)"
    torch.manual_seed(0)
    cfg = TrainConfig(
        method=method,
        unet_rep_stride=stride,
        batch_labeled=4,
        batch_unlabeled=4,
        rep_dim=32,
        proj_dim=32,
        criterion="ce+dice",
        warmup_epochs=0,
        out=str(tmp_path),
        quiet=True,
    )
    tr = Trainer(cfg)
    lab, unl = next(iter(tr._batches(0)))
    benchmark.pedantic(lambda: tr.train_step(lab, unl, CTX), rounds=5, warmup_rounds=2)
