"""busseg_ops: accelerated operators for relation-aware semi-supervised breast-ultrasound
lesion segmentation (RA-BUSSeg, PH-Net, LA-Net, SemiSeg-CAW). The math of every op is in
docs/ops.md; each op lives under its own name in ops/, reference/, triton/ and csrc/."""

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

from .backends import BACKENDS, available_backends, use_backend
from .ops.adaptive_patch_cutmix import adaptive_patch_cutmix, cutmix_patch_mask, shield_count
from .ops.adjacent_relation_propagation import adjacent_relation_propagation
from .ops.class_memory_bank import ClassMemoryBank
from .ops.confidence_masked_cross_entropy import confidence_masked_cross_entropy
from .ops.cross_layer_alignment_loss import cross_layer_alignment_loss
from .ops.entropy_filtered_cross_entropy import entropy_filtered_cross_entropy
from .ops.gather_proxies import gather_proxies
from .ops.greedy_proxy_sampling import greedy_proxy_sampling
from .ops.map_proxy_indices import map_proxy_indices
from .ops.memory_contrastive_loss import memory_contrastive_loss
from .ops.patch_entropy_hardness import patch_entropy_hardness
from .ops.reliable_hard_pixels import ReliableHardPixels, reliable_hard_pixels
from .ops.sample_proxies import sample_proxies

__all__ = [
    "BACKENDS",
    "available_backends",
    "use_backend",
    "adjacent_relation_propagation",
    # PH-Net
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
    # RA-BUSSeg CRA
    "greedy_proxy_sampling",
    "sample_proxies",
    "map_proxy_indices",
    "gather_proxies",
    "cross_layer_alignment_loss",
]
__version__ = "0.1.0"
