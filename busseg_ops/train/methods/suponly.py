"""Supervised only: L_s on the labelled images; the baseline."""

from __future__ import annotations

from .base import Method


class SupOnly(Method):
    name = "suponly"
    summary = "supervised only: cross-entropy (or --criterion) on the labelled images; the baseline."
