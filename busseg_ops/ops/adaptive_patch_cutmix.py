"""adaptive_patch_cutmix: PH-Net's adaptive patch augmentation (Eq. 5-7), with its random mask
(cutmix_patch_mask) and shield count (Eq. 5). Public functions and fake kernels of
``busseg::cutmix_patch_mask`` and ``busseg::adaptive_patch_cutmix``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _validate
from ..backends import Op, dispatch, register
from ..reference.adaptive_patch_cutmix import adaptive_patch_cutmix as _reference
from ..reference.adaptive_patch_cutmix import cutmix_patch_mask as _reference_mask

OP = Op(
    "adaptive_patch_cutmix",
    reference=_reference,
    missing={"triton": "not written (a byte gather of tensors of any dtype; the cuda kernel covers GPUs)"},
)
#: The random mask's own op (busseg::cutmix_patch_mask, csrc/adaptive_patch_cutmix/): from the
#: hardness and the uniforms the front end draws, so every backend builds the same mask.
MASK_OP = Op(
    "cutmix_patch_mask",
    reference=_reference_mask,
    missing={"triton": "not written (two sorts of each image's patches; the cuda kernel covers GPUs)"},
)


def shield_count(beta: float, progress: float, n_patches: int) -> int:
    """PH-Net Eq. 5: k = floor(β · t/T · N²) hardest patches shielded; ``progress`` = t/T in
    [0, 1], ``n_patches`` = N² (all patches of an image)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress (t/T) must be in [0, 1], got {progress}")
    _validate.integer("n_patches", n_patches, minimum=1)
    return int(math.floor(beta * progress * n_patches + 1e-9))


def _uniforms(batch: int, patches: int, generator, device) -> torch.Tensor:
    """(B, 1 + patches) float32 uniforms on ``device``: column 0 for the share of each image, then
    a key per patch. Drawn where ``generator`` lives (the device's default generator without one):
    on the tensors' device in one draw, nothing crosses to the host; a CPU generator draws as it
    always has (the shares, then the keys), and a CPU generator for GPU tensors costs a copy that
    waits for the GPU."""
    gen_device = generator.device if generator is not None else torch.device(device)
    if gen_device.type != "cpu":
        return torch.rand(batch, 1 + patches, generator=generator, device=gen_device).to(device)
    share = torch.rand(batch, generator=generator)
    keys = torch.rand(batch, patches, generator=generator)
    return torch.cat([share[:, None], keys], 1).to(device)


def _check_mask_args(hardness, shield_count, mix_range, generator) -> tuple[float, float]:
    _validate.tensor("hardness", hardness, 3, "(B, Nh, Nw)")
    n = hardness.shape[1] * hardness.shape[2]
    _validate.integer("shield_count", shield_count, minimum=0)
    if shield_count > n:
        raise ValueError(f"shield_count must be <= N² = {n}, got {shield_count}")
    if (
        not isinstance(mix_range, (tuple, list))
        or len(mix_range) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mix_range)
        or not 0.0 <= mix_range[0] <= mix_range[1] <= 1.0
    ):
        raise ValueError(f"mix_range must satisfy 0 <= low <= high <= 1, got {mix_range}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return float(mix_range[0]), float(mix_range[1])


def cutmix_patch_mask(
    hardness: torch.Tensor, shield_count: int, mix_range=(0.1, 0.5), generator: torch.Generator | None = None
) -> torch.Tensor:
    """The random part of Eq. 5-7 alone: (B, Nh, Nw) bool, True = kept. Per image, the
    ``shield_count`` hardest patches are kept; n = round(U(mix_range)·N²) (capped at N² − k) of the
    others, chosen uniformly, are marked for replacement. Vectorised over the batch. The draws come
    from ``generator`` (default: the tensors' device's); a generator on the tensors' device keeps
    a GPU call free of host synchronisation (docs/ops.md)."""
    lo, hi = _check_mask_args(hardness, shield_count, mix_range, generator)
    return _draw_mask(hardness, shield_count, lo, hi, generator)


def _draw_mask(hardness, shield_count, low, high, generator):
    B, Nh, Nw = hardness.shape
    uniforms = _uniforms(B, Nh * Nw, generator, hardness.device)
    return dispatch(MASK_OP, hardness.device)(hardness.detach(), uniforms, int(shield_count), low, high)


def adaptive_patch_cutmix(
    tensors: Sequence[torch.Tensor],
    hardness: torch.Tensor,
    shield_count: int,
    mix_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
):
    """PH-Net Eq. 5-7 (docs/ops.md). ``tensors``: (B, ..., H, W) tensors mixed with one mask
    (image, pseudo-label, confidence, …); ``hardness`` (B, Nh, Nw). Returns (mixed tensors,
    patch_mask) with patch_mask (B, Nh, Nw) bool, True = kept from the own image, False = taken
    from image (b+1) mod B::

        A(x_b) = M ⊙ x_b + (1 − M) ⊙ x_{(b+1) mod B}

    One fused gather over all tensors, of any dtypes (each output keeps its tensor's dtype, under
    torch.autocast too). B = 1 returns copies and a mask of ones. The mask's draws as in
    :func:`cutmix_patch_mask`."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise TypeError("tensors must be a non-empty list of tensors")
    _validate.tensor("hardness", hardness, 3, "(B, Nh, Nw)")
    B, Nh, Nw = hardness.shape
    for i, t in enumerate(tensors):
        _validate.tensor(f"tensors[{i}]", t, floating=False)
        if t.dim() < 3:
            raise ValueError(f"tensors[{i}] must be (B, ..., H, W), got shape {tuple(t.shape)}")
        if t.shape[0] != B or t.shape[-2:] != tensors[0].shape[-2:]:
            raise ValueError(
                f"tensors[{i}] {tuple(t.shape)} must share B={B} and H×W with tensors[0] {tuple(tensors[0].shape)}"
            )
        if t.device != hardness.device:
            raise ValueError(f"tensors[{i}] and hardness must be on the same device")
    H, W = tensors[0].shape[-2:]
    if H % Nh or W % Nw:
        raise ValueError(f"the hardness grid {Nh}×{Nw} does not divide the map size {H}×{W}")
    lo, hi = _check_mask_args(hardness, shield_count, mix_range, generator)
    if B == 1:
        return [t.clone() for t in tensors], torch.ones_like(hardness, dtype=torch.bool)
    mask = _draw_mask(hardness, shield_count, lo, hi, generator)
    return list(dispatch(OP, hardness.device)(list(tensors), mask)), mask


def _fake(tensors, patch_mask):
    _validate.one_device(OP.name, patch_mask=patch_mask, **{f"tensors[{i}]": t for i, t in enumerate(tensors)})
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def _fake_mask(hardness, uniforms, shield_count, low, high):
    _validate.one_device(MASK_OP.name, hardness=hardness, uniforms=uniforms)
    return hardness.new_empty(hardness.shape, dtype=torch.bool)


register(OP, fake=_fake)
register(MASK_OP, fake=_fake_mask)
