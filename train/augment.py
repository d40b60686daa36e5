"""Augmentation. Weak (per sample, in the dataset), as the U2PL / RA-BUSSeg / PH-Net data code:
scale the original image by a random factor (aspect kept; half the time below 1, half above),
random horizontal flip, then a random crop, padding first (centred; image 0, mask 255 = ignore)
when the scaled image is smaller than the crop. Strong (per batch, in the training step): box
cutmix between images of the unlabelled batch (RA-BUSSeg, UniMatch style); PH-Net's adaptive
patch cutmix is the busseg_ops op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = 255


def resize(image: torch.Tensor, mask: torch.Tensor, size: int | tuple[int, int]):
    """image (1, H, W) float bilinear, mask (H, W) long nearest, to size×size (or (h, w))."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=hw, mode="nearest")[0, 0].long()
    return image, mask


def weak(
    image: torch.Tensor,
    mask: torch.Tensor,
    crop: int,
    g: torch.Generator,
    scale: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
):
    """image (1, H, W), mask (H, W) → a crop×crop sample. The factor is drawn as upstream's
    RandResize: with probability ½ uniform in [scale[0], 1], else uniform in [1, scale[1]]; the
    scaled size is int(H·s) × int(W·s). All draws come from `g`."""
    below, u, f = torch.rand(3, generator=g).tolist()
    s = scale[0] + (1 - scale[0]) * u if below < 0.5 else 1 + (scale[1] - 1) * u
    h, w = mask.shape
    image, mask = resize(image, mask, (max(1, int(h * s)), max(1, int(w * s))))
    if flip and f < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    h, w = mask.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        border = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        image = F.pad(image, border, value=0.0)
        mask = F.pad(mask, border, value=IGNORE)
    h, w = mask.shape
    y = int(torch.randint(0, h - crop + 1, (), generator=g))
    x = int(torch.randint(0, w - crop + 1, (), generator=g))
    return image[:, y : y + crop, x : x + crop].contiguous(), mask[y : y + crop, x : x + crop].contiguous()


def cutmix_box(
    batch: int,
    h: int,
    w: int,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    generator=None,
) -> torch.Tensor:
    """(B, H, W) bool, True where the pixel comes from the *other* image; with probability 1 − p
    an image gets no box. Uses the global torch RNG unless a generator is given."""
    out = torch.zeros(batch, h, w, dtype=torch.bool)
    r = torch.rand(batch, 4, generator=generator)
    for b in range(batch):
        if r[b, 0] > p:
            continue
        a = (area[0] + (area[1] - area[0]) * r[b, 1].item()) * h * w
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[b, 2].item()
        ar = math.exp(log_r)
        bh = min(h, max(1, int(round(math.sqrt(a / ar)))))
        bw = min(w, max(1, int(round(math.sqrt(a * ar)))))
        y = int(r[b, 3].item() * (h - bh + 1))
        x = int(torch.randint(0, w - bw + 1, (), generator=generator))
        out[b, y : y + bh, x : x + bw] = True
    return out


def mix(box: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Paste each tensor's rolled batch ((b+1) mod B) where `box` is True. Tensors are (B, H, W) or
    (B, C, H, W)."""
    out = []
    for t in tensors:
        m = box.to(t.device)
        if t.dim() == 4:
            m = m[:, None]
        out.append(torch.where(m, t.roll(-1, dims=0), t))
    return out
