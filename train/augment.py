"""Augmentation. Weak (per sample, in the dataset): resize to the base size, random scale 0.5–2.0,
pad (image 0, mask 255 = ignore) and random crop, horizontal flip — as in U2PL/PH-Net/RA-BUSSeg.
Strong (per batch, in the training step): box cutmix between images of the unlabelled batch
(RA-BUSSeg, UniMatch style); PH-Net's adaptive patch cutmix is the busseg_ops op.
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
    size: int,
    g: torch.Generator,
    scale: tuple[float, float] = (0.5, 2.0),
    flip: float = 0.5,
):
    """Random scale, pad with ignore, random size×size crop, random horizontal flip."""
    s = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item()
    side = max(8, int(round(size * s)))
    image, mask = resize(image, mask, side)
    if side < size:
        p = size - side
        image = F.pad(image, (0, p, 0, p), value=0.0)
        mask = F.pad(mask, (0, p, 0, p), value=IGNORE)
    h, w = mask.shape
    y = int(torch.randint(0, h - size + 1, (), generator=g))
    x = int(torch.randint(0, w - size + 1, (), generator=g))
    image, mask = image[:, y : y + size, x : x + size], mask[y : y + size, x : x + size]
    if torch.rand((), generator=g).item() < flip:
        image, mask = image.flip(-1), mask.flip(-1)
    return image.contiguous(), mask.contiguous()


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
