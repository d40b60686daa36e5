"""Checkpoints: atomic writes (temp file in the same folder + fsync + rename, so a crash never
leaves a half-written file), RNG states for bit-for-bit resume, and a SIGINT/SIGTERM guard that
lets the loop finish its step and save before exiting."""

from __future__ import annotations

import os
import random
import signal
import tempfile

import numpy as np
import torch


def save(state: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopGuard:
    """While active, SIGINT/SIGTERM only set `requested`; the loop saves and stops at the next step
    boundary. A second signal restores the default behaviour (so Ctrl-C twice still kills)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        self.requested = True
        for s, h in self._old.items():
            signal.signal(s, h)

    def __enter__(self):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: no handlers, never requested
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
