"""Process CPU time (user + sys) of bench_compat.py's groups on one thread, the implementations
interleaved round by round: the work each does, a view that a loaded machine distorts less than
the wall-clock medians of bench_compat.py (there, every OpenMP region of an op-heavy baseline
waits for a descheduled second thread). Prints the minimum per implementation and the ratios.

    BUSSEG_UPSTREAM_DIR=$PWD/upstream .venv/bin/python benchmarks/compat_cpu_time.py [rounds]

Without BUSSEG_UPSTREAM_DIR the published code is left out (the restatement stays)."""

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]  # benchmarks/, tests/support
import bench_compat as bc  # noqa: E402
from conftest import PRETOUCH_GIB  # noqa: E402
from support import published  # noqa: E402

GROUPS = {
    "rabusseg Corr fwd+bwd": (bc.CORR, lambda impl: bc.corr_inputs(), bc.corr_step),
    "rabusseg compute_rank_loss_landmark fwd+bwd": (bc.RANK, bc.rank_inputs, bc.rank_step),
    "phnet devide+hard_ratio+generate_patch_data": (bc.PIPELINE, lambda impl: bc.pipeline_inputs(), bc.pipeline),
    "phnet patch_contrast fwd+bwd": (bc.CONTRAST, lambda impl: bc.contrast_inputs(), bc.contrast_step),
}


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    torch.ones(PRETOUCH_GIB << 28)  # as benchmarks/conftest.py: allocate from memory the host backs
    impls = [i for i in bc.IMPLS if i != "upstream_published" or published.missing_requirement() is None]
    for group, (table, inputs, step) in GROUPS.items():
        runs = {impl: (table[impl](), inputs(impl)) for impl in impls}
        cpu = {impl: [] for impl in impls}
        for _ in range(rounds):
            for impl, (fn, args) in runs.items():
                start = time.process_time()
                step(fn, *args)
                cpu[impl].append(time.process_time() - start)
        best = {impl: min(times) for impl, times in cpu.items()}
        ratios = ", ".join(f"{best[b] / best['compat']:.1f}× {b}" for b in impls if b != "compat")
        print(f"{group}: " + ", ".join(f"{impl} {t * 1000:.0f} ms" for impl, t in best.items()) + f" ({ratios})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
