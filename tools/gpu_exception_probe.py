"""Which C++ exceptions crash the process: each case makes one call that must raise, in a process of
its own under faulthandler, once per setting of TORCH_SHOW_CPP_STACKTRACES and
TORCH_DISABLE_ADDR2LINE; the table of how each call ended is the result (exit status 0).

Why: a CUDA binding's ValueError, thrown before any launch, killed a test with a segmentation fault
on an H200; this tells in one run which exception paths crash, and under which settings (the
cases and the report: docs/gpu.md).

    python tools/gpu_exception_probe.py [--json PATH] [--cpu-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the environment variables the settings set (and take out of the inherited environment)
SETTING_VARIABLES = ("TORCH_SHOW_CPP_STACKTRACES", "TORCH_DISABLE_ADDR2LINE")
SETTINGS = {
    "stacktraces 0": {"TORCH_SHOW_CPP_STACKTRACES": "0"},
    "stacktraces 1": {"TORCH_SHOW_CPP_STACKTRACES": "1"},
    "stacktraces 0, no addr2line": {"TORCH_SHOW_CPP_STACKTRACES": "0", "TORCH_DISABLE_ADDR2LINE": "1"},
    "stacktraces 1, no addr2line": {"TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1"},
}
TIMEOUT_S = 60
GDB_TIMEOUT_S = 45  # gdb reads the symbols of torch's libraries (a GiB) first
MARK_RAISED, MARK_NO_ERROR = "PROBE-RAISED ", "PROBE-NO-ERROR"
#: what torch says when a raw-op call does not match the op's schema (the call never reached the kernel)
SCHEMA_MISMATCH = ("Expected a value of type", "missing value for argument", "Declaration:", "Unknown keyword")

# Each case's body runs inside a function; ``t(*shape)`` makes a random float32 tensor on ``dev``
# (the probe's device, "cuda"; the tests run the same calls on the CPU), ``cpu(*shape)`` one on the
# CPU. Every call is bad in exactly one argument, chosen so that the op's argument check
# (csrc/<op>/checks.h) rejects it first.
_PRELUDE = """
import sys
import torch
{imports}
dev = {device!r}
def t(*shape):
    return torch.randn(*shape, device=dev)
def cpu(*shape):
    return torch.randn(*shape)
def case():
{body}
try:
    case()
except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0]
    print({raised!r} + type(e).__name__ + ": " + first[:300], flush=True)
    sys.exit(0)
print({no_error!r}, flush=True)
sys.exit(3)
"""


@dataclass(frozen=True)
class Case:
    name: str  # what is called, and the bad argument
    body: str
    expect: str  # what the exception's message says (the tests check it on the CPU)
    cuda: bool = True  # needs a CUDA device
    busseg: bool = True  # needs busseg_ops
    control: bool = False  # not a CUDA binding of ours: torch's own checks, our CPU binding


def _call(op: str, args: str) -> str:
    return f"torch.ops.busseg.{op}({args})"


_ARP = "f, v = {d}(1, 4, 6, 6), {d}(1, 2, 6, 6)\n"
_ARP_BAD = _call("adjacent_relation_propagation", "f, v, 2, 1, 0.5, False")
_FIRST = "first = torch.zeros(1, dtype=torch.long, device=dev)\n"
_CONTRASTIVE = (
    "a, n, p = t(8, 4), t(8, 4), t(2, 4)\n"
    "ya = yn = torch.zeros(8, dtype=torch.long, device=dev)\n"
    "hp = torch.ones(2, dtype=torch.bool, device=dev)\n"
)
_CRA = "feats = [t(1, 4, 9), t(1, 6, 9)]\nproxies = [t(1, 3, 4), t(1, 3, 6)]\n"
_KERNEL_SIZE = "kernel_size must be odd"

CASES = [
    # controls: torch's own C++ checks, and our CPU binding's (also with a CUDA context in the process)
    Case(
        "torch mm, CPU: shapes",
        "torch.mm(cpu(2, 3), cpu(2, 3))",
        "cannot be multiplied",
        cuda=False,
        busseg=False,
        control=True,
    ),
    Case("torch mm, CUDA: shapes", "torch.mm(t(2, 3), t(2, 3))", "cannot be multiplied", busseg=False, control=True),
    Case("ARP, CPU op: kernel_size=2", _ARP.format(d="cpu") + _ARP_BAD, _KERNEL_SIZE, cuda=False, control=True),
    Case(
        "ARP, CPU op after CUDA init: kernel_size=2",
        "torch.zeros(1, device=dev)\n" + _ARP.format(d="cpu") + _ARP_BAD,
        _KERNEL_SIZE,
        control=True,
    ),
    # one bad call per CUDA binding, each rejected by the op's argument check
    Case("ARP forward, CUDA: kernel_size=2", _ARP.format(d="t") + _ARP_BAD, _KERNEL_SIZE),
    Case(
        "ARP backward, CUDA: kernel_size=2",
        _ARP.format(d="t")
        + "g, w = t(1, 2, 6, 6), t(1, 4, 6, 6)\n"
        + _call("adjacent_relation_propagation_backward", "g, f, v, w, 2, 1, 0.5, False, True, True"),
        _KERNEL_SIZE,
    ),
    Case(
        "greedy sampling, CUDA: num_proxies=0",
        _FIRST + _call("greedy_proxy_sampling", "t(1, 4, 5, 5), first, 0, 0.5"),
        "num_proxies must be in",
    ),
    Case(
        "hardness forward, CUDA: patch_h=0",
        _call("patch_entropy_hardness", "t(1, 2, 8, 8), 0, 4, True, 1e-8"),
        "must divide the map size",
    ),
    Case(
        "hardness backward, CUDA: patch_h=0",
        _call("patch_entropy_hardness_backward", "t(1, 2, 2), t(1, 2, 8, 8), 0, 4, True, 1e-8"),
        "must divide the map size",
    ),
    Case(
        "cutmix, CUDA: 3×3 patches on 8×8",
        "mask = torch.ones(1, 3, 3, dtype=torch.bool, device=dev)\n"
        + _call("adaptive_patch_cutmix", "[t(1, 3, 8, 8)], mask"),
        "must divide the map size",
    ),
    Case(
        "contrastive forward, CUDA: temperature=0",
        _CONTRASTIVE + _call("memory_contrastive_loss", "a, ya, n, yn, p, hp, 0.0, False"),
        "temperature must be > 0",
    ),
    Case(
        "contrastive backward, CUDA: temperature=0",
        _CONTRASTIVE
        + _call(
            "memory_contrastive_loss_backward",
            "t(1), a, ya, n, yn, p, hp, t(8), torch.empty(0, device=dev), 0.0, False",
        ),
        "temperature must be > 0",
    ),
    Case(
        "CRA loss forward, CUDA: reduction='bogus'",
        _CRA + _call("cross_layer_alignment_loss", "feats, proxies, 'bogus', 1e-10, 64, False"),
        "reduction must be",
    ),
    Case(
        "CRA loss backward, CUDA: reduction='bogus'",
        _CRA
        + _call("cross_layer_alignment_loss_backward", "t(1), feats, proxies, t(9), 'bogus', 1e-10, 64, True, True"),
        "reduction must be",
    ),
]


def script(case: Case, device: str = "cuda") -> str:
    """The case as a program: exit 0 after printing the exception it raised, 3 if none."""
    return _PRELUDE.format(
        imports="import busseg_ops" if case.busseg else "",
        device=device,
        body=textwrap.indent(case.body, "    "),
        raised=MARK_RAISED,
        no_error=MARK_NO_ERROR,
    )


@dataclass
class Outcome:
    case: str
    setting: str
    result: str  # "raised ValueError", "SIGSEGV", "exit 1", "no error", "timed out"
    clean: bool  # raised a Python exception, the process intact
    message: str = ""
    crash: str = ""  # faulthandler's first line and innermost frame
    native_backtrace: str = ""


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _crash_summary(stderr: str) -> str:
    """faulthandler's 'Fatal Python error: ...' line and the innermost frame of its traceback."""
    lines = [line.strip() for line in stderr.splitlines()]
    fatal = next((line for line in lines if line.startswith("Fatal Python error")), "")
    frames = [line for line in lines if line.startswith('File "')]
    return "; ".join(x for x in (fatal, frames[0] if frames else "") if x)


def run_case(
    case: Case, setting: str, python: str = sys.executable, timeout: float = TIMEOUT_S, device: str = "cuda"
) -> Outcome:
    """The case in a process of its own under the setting's variables (and the case's own)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    env.update(SETTINGS[setting], PYTHONUNBUFFERED="1")
    cmd = [python, "-X", "faulthandler", "-c", script(case, device)]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(case.name, setting, "timed out", False, f"no answer in {timeout:.0f} s")
    raised = next((line for line in out.stdout.splitlines() if line.startswith(MARK_RAISED)), None)
    if out.returncode == 0 and raised:
        message = raised.removeprefix(MARK_RAISED)
        if any(s in message for s in SCHEMA_MISMATCH):
            return Outcome(case.name, setting, "schema mismatch", True, message + " (update the probe's call)")
        return Outcome(case.name, setting, "raised " + message.split(":", 1)[0], True, message)
    if out.returncode == 3 and MARK_NO_ERROR in out.stdout:
        return Outcome(case.name, setting, "no error", False, "the bad call returned")
    tail = [line for line in out.stderr.strip().splitlines() if line.strip()]
    if out.returncode < 0:
        return Outcome(
            case.name,
            setting,
            _signal_name(out.returncode),
            False,
            tail[-1] if tail else "",
            _crash_summary(out.stderr),
        )
    return Outcome(case.name, setting, f"exit {out.returncode}", False, tail[-1] if tail else "")


def native_backtrace(case: Case, setting: str, python: str = sys.executable) -> str:
    """gdb's backtrace of the case's crash (empty without gdb)."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return ""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    env.update(SETTINGS[setting])
    cmd = [gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", python, "-X", "faulthandler", "-c", script(case)]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GDB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"gdb: no backtrace within {GDB_TIMEOUT_S} s"
    frames = [line[:200] for line in out.stdout.splitlines() if line.startswith("#")]
    return "\n".join(frames[:30])


def probe(cases=CASES, settings=tuple(SETTINGS), python=sys.executable, jobs: int | None = None, gdb: bool = True):
    """Every case under every setting, ``jobs`` processes at a time; then (``gdb``) gdb on the first
    crashing case, a CUDA binding's where one crashed."""
    pairs = [(c, s) for c in cases for s in settings]
    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        outcomes = list(pool.map(lambda p: run_case(*p, python=python), pairs))
    crashes = [(c, o) for (c, _), o in zip(pairs, outcomes) if o.result.startswith("SIG")]
    crashed = next((x for x in crashes if not x[0].control), crashes[0] if crashes else None)
    if crashed and gdb:
        case, outcome = crashed
        outcome.native_backtrace = native_backtrace(case, outcome.setting, python)
    return outcomes


def table(outcomes: list[Outcome]) -> list[str]:
    """Markdown: one row per case, one column per setting, then the message of the first setting."""
    settings = list(dict.fromkeys(o.setting for o in outcomes))
    cases = list(dict.fromkeys(o.case for o in outcomes))
    cell = {(o.case, o.setting): o for o in outcomes}
    lines = [
        "| case | " + " | ".join(settings) + " | message (first setting) |",
        "|---|" + "---|" * (len(settings) + 1),
    ]
    for case in cases:
        first = cell[(case, settings[0])]
        results = [cell[(case, s)].result if (case, s) in cell else "" for s in settings]
        detail = first.message if first.clean or not first.crash else f"{first.message} ({first.crash})"
        lines.append(f"| {case} | " + " | ".join(results) + f" | {detail.replace('|', '/')} |")
    return lines


def summary(outcomes: list[Outcome]) -> str:
    """How many calls of the CUDA bindings did not raise cleanly, under which settings; the same for
    the controls where any did not."""
    controls = {c.name for c in CASES if c.control}
    parts = []
    for label, probed in (
        ("CUDA-binding", [o for o in outcomes if o.case not in controls]),
        ("control", [o for o in outcomes if o.case in controls]),
    ):
        bad = [o for o in probed if not o.clean]
        if bad:
            by_setting: dict[str, set] = {}
            for o in bad:
                by_setting.setdefault(o.setting, set()).add(o.case)
            cases = len({o.case for o in probed})
            per = "; ".join(f"{s}: {len(c)} of {cases}" for s, c in by_setting.items())
            parts.append(f"{len(bad)} of {len(probed)} {label} calls did not raise cleanly ({per}).")
        elif label == "CUDA-binding":
            parts.append(
                f"Every CUDA binding's exception path raised cleanly ({len(probed)} calls)."
                if probed
                else "No CUDA binding was probed."
            )
    return " ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    parser.add_argument("--cpu-only", action="store_true", help="only the cases that need no CUDA device")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not c.cuda] if args.cpu_only else CASES
    outcomes = probe(cases)
    print("\n".join(table(outcomes)))
    print(summary(outcomes))
    for o in outcomes:
        if o.native_backtrace:
            print(f"\ngdb backtrace of '{o.case}' ({o.setting}):\n{o.native_backtrace}")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
