"""Peak extra resident memory of a piece of code, for tests and benchmarks: measured in a fresh
Python process from /proc/self/status VmHWM, since tracemalloc does not see torch's allocations.
Large blocks are mmap'ed and returned on free (MALLOC_MMAP_THRESHOLD_), so the reading does not
depend on the allocator's history.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# The child resets the high-water mark after setup (writing 5 to /proc/self/clear_refs) where the
# kernel allows it, else subtracts the setup's own peak.
_CHILD = """
import os, torch
torch.set_num_threads({threads})
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
{setup}
{stmt_warm}
import gc; gc.collect()
try:
    open('/proc/self/clear_refs', 'w').write('5')
except OSError:
    pass
base = max(rss(), 0)
before = hwm()
{stmt}
print(hwm() - (base if before <= base + 1 else before))
"""


def peak_extra_mib(setup: str, stmt: str, threads: int = 2, warm: bool = False) -> float:
    """Run ``setup`` then ``stmt`` in a fresh process; MiB the statement adds at its peak.

    ``warm`` runs the statement once before measuring (for code that compiles on first call)."""
    code = _CHILD.format(
        threads=threads,
        setup=textwrap.dedent(setup),
        stmt=textwrap.dedent(stmt),
        stmt_warm=textwrap.dedent(stmt) if warm else "",
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # make bench's timing knobs
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])
