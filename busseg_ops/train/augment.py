"""Augmentation as the U2PL / RA-BUSSeg / PH-Net data code: weak per sample (random scale, flip,
crop, in the dataset), strong per batch (cutmix, in the training step; docs/methods.md)."""

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


def fov_size(h: int, w: int, fov: int) -> tuple[int, int]:
    """(h, w) scaled, aspect kept, so that the longer side is `fov` (0: unchanged), each side
    round(side · fov / longer) with Python's rounding (half to even), at least 1. In integer
    arithmetic without branches, so that torch.export traces it on symbolic sizes (busseg export)."""
    if not fov:
        return h, w
    longer = torch.sym_max(h, w)
    sides = []
    for side in (h, w):
        q = side * fov // longer
        r = side * fov - q * longer
        # + 1 iff r / longer > 1/2, or = 1/2 with q odd
        sides.append(torch.sym_max(1, q + (2 * r + q % 2) // (longer + 1)))
    return tuple(sides)


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


# PH-Net's generate_patch_data (patch_helper.py): ex_ratio 40, and one patch more than that share.
EASY_SHARE = 0.4


def easy_patch_swap(
    tensors: list[torch.Tensor], hardness: torch.Tensor, share: float = EASY_SHARE
) -> list[torch.Tensor]:
    """PH-Net's released APA mixing ("easy_easy"): in each image b the m = round(share·N²) + 1
    easiest patches (lowest hardness) are replaced by the m easiest patches of image (b+1) mod B,
    both taken in raster order; the harder patches stay. `tensors`: (B, ..., H, W) with H and W
    divisible by N; `hardness` (B, N, N). B = 1: unchanged."""
    b, n = hardness.shape[0], hardness.shape[1]
    m = min(n * n, round(n * n * share) + 1)
    easiest = hardness.flatten(1).argsort(1)[:, :m]
    pos = easiest.sort(1).values  # raster order, as boolean-mask indexing takes them
    src = pos.roll(-1, 0)
    rows = torch.arange(b, device=pos.device)[:, None]
    out = []
    for t in tensors:
        h, w = t.shape[-2:]
        lead = t.shape[1:-2]
        k = len(lead)
        x = t.reshape(b, *lead, n, h // n, n, w // n)
        # (B, n·n, ..., h/n, w/n): the patches, row-major
        order = (0, k + 1, k + 3, *range(1, k + 1), k + 2, k + 4)
        p = x.permute(order).reshape(b, n * n, *lead, h // n, w // n)
        mixed = p.clone()
        mixed[rows, pos.to(t.device)] = p.roll(-1, 0)[rows, src.to(t.device)]
        back = mixed.reshape(b, n, n, *lead, h // n, w // n)
        inverse = (0, *range(3, 3 + k), 1, 3 + k, 2, 4 + k)
        out.append(back.permute(inverse).reshape(t.shape))
    return out
