"""`make demo`, part 2: train suponly and rabusseg on the embedded synthetic BUS set (1/4 labelled)
on the CPU, print both test Dice, and point at the overlays and curve plots. DEMO_EPOCHS overrides
the epoch count. Each run prints its data banner and one line per epoch."""

import os
import time

import torch

from busseg_ops.train import TrainConfig, run

OUT = "runs/demo"


def main() -> None:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    epochs = int(os.environ.get("DEMO_EPOCHS", "8"))
    common = dict(
        data="synthetic",
        synthetic_n=200,
        synthetic_size=64,
        crop=64,
        partition="1/4",
        batch_labeled=4,
        batch_unlabeled=4,
        epochs=epochs,
        warmup_epochs=1,
        lr=0.02,
        unet_base=8,
        proj_dim=32,
        rep_dim=16,
        num_proxies=16,
        overlays=8,
        quiet=True,
        # A short from-scratch run: with the papers' EMA 0.999 the teacher would average weights from
        # the whole (short) trajectory, and CE alone sits on the all-background solution for many steps.
        ema=0.9,
        criterion="ce+dice",
    )
    t0 = time.time()
    results = {}
    for method in ("suponly", "rabusseg"):
        print(f"training {method} ({epochs} epochs) ...", flush=True)
        # overwrite: a second `make demo` replaces the first one's runs
        res = run(TrainConfig(method=method, out=os.path.join(OUT, method), **common), overwrite=True)
        results[method] = res
        print(f"  {method}: test Dice {res['dice'][0]:.4f} ± {res['dice'][1]:.4f}  ({res['wall_s']:.0f} s)", flush=True)
    print(
        f"\nheld-out synthetic test set ({len(os.listdir(os.path.join(OUT, 'suponly', 'overlays')))} overlays each), "
        f"total {time.time() - t0:.0f} s"
    )
    for method, res in results.items():
        d = os.path.join(OUT, method)
        print(f"  {method:9s} Dice {res['dice'][0]:.4f}  IoU {res['iou'][0]:.4f}  HD95 {res['hd95'][0]:.1f} px")
        print(f"            overlays {d}/overlays/ (red GT, green prediction, yellow overlap), curves {d}/curves.png")
    print(f"compare them: .venv/bin/busseg compare {OUT}/suponly {OUT}/rabusseg")


if __name__ == "__main__":
    main()
