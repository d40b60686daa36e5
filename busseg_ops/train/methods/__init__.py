"""The training methods, one module each. A method (a `Method` subclass) owns its name and summary,
its settings group (cfg.<name>), its network, its checks and its training step; nothing outside
this package branches on a method's name: it looks the method up here.

The networks and ops are imported when a method builds them, so that `busseg --help` (which reads
the methods' settings) loads no model code."""

from __future__ import annotations

from ..errors import UserError
from .base import (
    IGNORE,
    UPSTREAM_OHEM_PIXELS,
    Method,
    PseudoLabelSettings,
    ce,
    entropy_keep,
    ohem_ce,
    ohem_keep,
    ohem_min_kept,
    segmentation_network,
    soft_dice_loss,
    teacher_train_forward,
    unreliable_filtered_ce,
    unreliable_percent,
)
from .lanet import LANet, bce
from .phnet import PHNet, bank_centres, contrastive_stats, patch_prototype_contrast
from .rabusseg import RABUSSeg, relation_grid
from .semiseg_caw import SemiSegCAW
from .suponly import SupOnly

METHODS = {m.name: m for m in (SupOnly, RABUSSeg, PHNet, LANet, SemiSegCAW)}

# The settings groups, cfg.<key>: the one several methods share, then each method's own.
GROUPS = {"pseudo": PseudoLabelSettings, **{m.name: m.settings for m in METHODS.values() if m.settings}}


def get(name: str) -> type[Method]:
    """The method called `name`."""
    if name not in METHODS:
        raise UserError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def build(cfg) -> Method:
    """The training step of cfg.method."""
    return get(cfg.method)(cfg)


__all__ = [
    "GROUPS",
    "IGNORE",
    "METHODS",
    "UPSTREAM_OHEM_PIXELS",
    "LANet",
    "Method",
    "PHNet",
    "PseudoLabelSettings",
    "RABUSSeg",
    "SemiSegCAW",
    "SupOnly",
    "bank_centres",
    "bce",
    "build",
    "ce",
    "contrastive_stats",
    "entropy_keep",
    "get",
    "ohem_ce",
    "ohem_keep",
    "ohem_min_kept",
    "patch_prototype_contrast",
    "relation_grid",
    "segmentation_network",
    "soft_dice_loss",
    "teacher_train_forward",
    "unreliable_filtered_ce",
    "unreliable_percent",
]
