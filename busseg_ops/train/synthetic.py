"""Deterministic synthetic breast-ultrasound images: the embedded default for `make demo` and tests.

Each image is a function of its seed only: layered tissue texture, one hypoechoic lesion of random
size and irregular outline (malignant ones are more irregular), posterior acoustic shadowing below
it, depth attenuation, low lesion contrast, and multiplicative Rayleigh speckle.
"""

from __future__ import annotations

import numpy as np

BENIGN, MALIGNANT = 0, 1


def _smooth(rng: np.random.RandomState, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse noise upsampled bilinearly."""
    gh, gw = h // cell + 2, w // cell + 2
    coarse = rng.rand(gh, gw)
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Separable box blur with edge padding (speckle has a correlation length of a few pixels)."""
    k = 2 * r + 1
    p = np.pad(img, r, mode="edge")
    c = np.cumsum(np.pad(p, ((0, 0), (1, 0))), axis=1)
    p = (c[:, k:] - c[:, :-k]) / k
    c = np.cumsum(np.pad(p, ((1, 0), (0, 0))), axis=0)
    return (c[k:] - c[:-k]) / k


def make_image(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray, int]:
    """One synthetic BUS image: (uint8 image (size, size), uint8 mask 0/1, class 0 benign/1 malignant)."""
    rng = np.random.RandomState(seed % (2**32))
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)

    # Tissue: skin line, layered fat/glandular bands bending with depth, smooth texture.
    depth = yy / h
    bands = 0.5 + 0.25 * np.sin(2 * np.pi * (depth * rng.uniform(2, 5) + 0.15 * _smooth(rng, h, w, max(4, size // 8))))
    tissue = 0.35 + 0.35 * bands * _smooth(rng, h, w, max(2, size // 16)) + 0.2 * _smooth(rng, h, w, max(4, size // 6))
    tissue[: max(2, size // 40)] = 0.9  # bright skin line

    # Lesion: polar outline r(θ) = R·(1 + Σ a_k cos(kθ + φ_k)); malignant → more harmonics, larger amplitudes.
    cls = int(rng.rand() < 0.35)
    radius = size * rng.uniform(0.08, 0.25)
    cy = rng.uniform(0.3, 0.65) * h
    cx = rng.uniform(0.25, 0.75) * w
    aspect = rng.uniform(0.55, 1.0)  # wider than tall, as most lesions are
    theta = np.arctan2((yy - cy) / aspect, xx - cx)
    dist = np.hypot((yy - cy) / aspect, xx - cx)
    outline = np.ones_like(theta)
    harmonics = range(2, 12 if cls == MALIGNANT else 5)
    for k in harmonics:
        amp = rng.uniform(0, 0.18 if cls == MALIGNANT else 0.08) / (1 + 0.15 * k)
        outline += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    mask = dist <= radius * outline

    # Hypoechoic, low-contrast lesion with a soft margin.
    contrast = rng.uniform(0.35, 0.7)
    edge = np.clip((radius * outline - dist) / max(1.0, size / 64), 0, 1)
    img = tissue * (1 - (1 - contrast) * edge)

    # Posterior shadowing: columns under the lesion are darkened, fading with distance below it.
    cols = mask.any(axis=0)
    if cols.any() and rng.rand() < 0.7:
        bottom = np.where(mask.any(axis=1))[0].max()
        below = np.clip((yy - bottom) / (0.5 * h), 0, 1) * (yy > bottom)
        width = _box_blur(cols[None, :].astype(np.float64).repeat(3, 0), max(1, size // 32))[1][None, :]
        img *= 1 - rng.uniform(0.2, 0.5) * width * np.sqrt(below) * (below > 0)

    img *= 1 - 0.45 * depth  # depth attenuation
    speckle = _box_blur(rng.rayleigh(scale=1.0, size=(h, w)), 1)
    img *= speckle / speckle.mean()
    img = np.clip(img / np.percentile(img, 99.5), 0, 1)
    return (img * 255).round().astype(np.uint8), mask.astype(np.uint8), cls
