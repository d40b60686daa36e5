"""map_proxy_indices: proxy pixel indices of RA-BUSSeg's cross-layer relation alignment moved from
the deepest grid to a finer layer's grid (upstream: the first stage has twice the resolution)."""

from __future__ import annotations

import math

import torch

from .. import _validate

#: Mapped indices are int64: a finer grid with more pixels than that holds would wrap them.
MAX_PIXELS = 2**63 - 1


def _grid(name: str, hw) -> tuple[int, int]:
    if (
        not isinstance(hw, (tuple, list))
        or len(hw) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {hw!r}")
    return int(hw[0]), int(hw[1])


def map_proxy_indices(idx: torch.Tensor, src_hw, dst_hw) -> torch.Tensor:
    """Pixel indices ``idx`` (any shape, any integer dtype, in [0, H*W)) on an (H, W) grid -> the
    top-left pixel of their block on a finer (H2, W2) grid, int64::

        f = ceil(W2 / W);  j = (i // W)·f·W2 + (i % W)·f

    Computed in int64 whatever ``idx``'s dtype (an int16 index on a 4000x4800 grid does not
    wrap); a ``dst_hw`` with more than 2^63 - 1 pixels, whose indices int64 cannot hold, is an
    error. Every mapped index is below H2·W2: the grids are checked so that the last row and
    column land inside ``dst_hw``."""
    _validate.tensor("idx", idx, None, floating=False, allow_empty=True)
    _validate.integer_tensor("idx", idx)
    H, W = _grid("src_hw", src_hw)
    H2, W2 = _grid("dst_hw", dst_hw)
    if H2 * W2 > MAX_PIXELS:
        raise ValueError(f"dst_hw={(H2, W2)} has {H2 * W2} pixels: its indices would overflow int64 (max 2^63 - 1)")
    f = math.ceil(W2 / W)
    if (H - 1) * f >= H2 or (W - 1) * f >= W2:
        raise ValueError(
            f"dst_hw={(H2, W2)} is too small for src_hw={(H, W)}: with f = ceil(W2/W) "
            f"= {f} the last row/column would map outside it"
        )
    idx = idx.long()  # H·W <= H2·W2 fits int64 (H <= H2, W <= W2 by the check above)
    _validate.in_range("idx", idx, H * W, f"pixel indices of the {H}x{W} grid")
    return (idx // W) * f * W2 + (idx % W) * f  # (idx // W)·f < H2: no intermediate above H2·W2
