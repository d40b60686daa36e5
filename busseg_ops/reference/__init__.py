"""Plain-PyTorch implementations of every op: the executable form of SPEC.md, the oracle for the
tests and the fallback backend on any device."""

from .arp import adjacent_relation_propagation
from .cra import cross_layer_alignment_loss, greedy_proxy_sampling
from .phnet import memory_contrastive_loss, patch_cutmix, patch_entropy_hardness

__all__ = [
    "adjacent_relation_propagation",
    "cross_layer_alignment_loss",
    "greedy_proxy_sampling",
    "patch_entropy_hardness",
    "patch_cutmix",
    "memory_contrastive_loss",
]
