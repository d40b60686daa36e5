"""busseg_ops: accelerated operators for relation-aware semi-supervised breast-ultrasound
lesion segmentation (RA-BUSSeg, PH-Net, LA-Net, SemiSeg-CAW). See SPEC and README."""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against: `import busseg_ops` alone works)

try:
    from . import _C  # noqa: F401  (registers the torch.ops.busseg.* schemas and kernels)
except ImportError as err:  # pragma: no cover - exercised only on an unbuilt checkout
    raise ImportError(
        "busseg_ops: the compiled extension busseg_ops._C is missing or broken. Build it from the "
        "repository root with `make install` (or `pip install --no-build-isolation -e .` inside an "
        "environment that already has torch); set FORCE_CUDA=1 to include the CUDA kernels. "
        f"Original error: {err}"
    ) from err

from .arp import adjacent_relation_propagation
from .backends import _HAS_TRITON, BACKENDS, available_backends, use_backend
from .cra import cross_layer_alignment_loss, gather_proxies, greedy_proxy_sampling, map_proxy_indices, sample_proxies
from .memory_bank import ClassMemoryBank
from .phnet import (
    ReliableHardPixels,
    adaptive_patch_cutmix,
    confidence_masked_cross_entropy,
    cutmix_patch_mask,
    entropy_filtered_cross_entropy,
    memory_contrastive_loss,
    patch_entropy_hardness,
    reliable_hard_pixels,
    shield_count,
)

if _HAS_TRITON:
    from . import triton as _triton_ops  # noqa: F401  (registers the busseg::*_triton ops)

__all__ = [
    "BACKENDS",
    "available_backends",
    "use_backend",
    "adjacent_relation_propagation",
    # PH-Net (issue 4)
    "patch_entropy_hardness",
    "adaptive_patch_cutmix",
    "cutmix_patch_mask",
    "shield_count",
    "confidence_masked_cross_entropy",
    "entropy_filtered_cross_entropy",
    "reliable_hard_pixels",
    "ReliableHardPixels",
    "ClassMemoryBank",
    "memory_contrastive_loss",
    # CRA (issue 3)
    "greedy_proxy_sampling",
    "sample_proxies",
    "map_proxy_indices",
    "gather_proxies",
    "cross_layer_alignment_loss",
]
__version__ = "0.1.0"
