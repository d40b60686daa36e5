"""greedy_proxy_sampling: RA-BUSSeg's "weak cross-correlation" proxy sampling of the cross-layer
relation alignment (CRA). Public function and fake kernel of ``busseg::greedy_proxy_sampling``."""

from __future__ import annotations

import torch

from .. import _validate
from ..backends import Op, dispatch, register
from ..reference.greedy_proxy_sampling import first_proxy_index
from ..reference.greedy_proxy_sampling import greedy_proxy_sampling as _reference

OP = Op(
    "greedy_proxy_sampling",
    reference=_reference,
    missing={
        # Sequential over the M steps, each reading the feature row of the pixel just chosen (an
        # address that comes from memory): that does not fit Triton's model (nor its interpreter).
        "triton": "its steps are sequential and each loads the feature row of a pixel chosen at run time",
    },
)


def check_features_and_count(feat, num_proxies) -> None:
    """``feat`` (B, C, H, W) floating and 1 <= ``num_proxies`` <= H*W (distinct pixels)."""
    _validate.tensor("feat", feat, 4, "(B, C, H, W)")
    _validate.integer("num_proxies", num_proxies, minimum=1)
    hw = feat.shape[2] * feat.shape[3]
    if num_proxies > hw:
        raise ValueError(f"num_proxies must be <= H*W = {hw} (distinct pixels), got {num_proxies}")


def _first_proxies(feat, first, label, generator):
    B, _, H, W = feat.shape
    if first is not None:
        _validate.tensor("first", first, 1, "(B,)", floating=False)
        _validate.integer_tensor("first", first)
        if tuple(first.shape) != (B,):
            raise ValueError(f"first must be (B,) = {(B,)}, got {tuple(first.shape)}")
        _validate.same("feat and first", feat, first)
        _validate.in_range("first", first, H * W, "pixel indices (H*W)")
        return first.long()
    if label is not None:
        if not isinstance(label, torch.Tensor):
            raise TypeError(f"label must be a torch.Tensor, got {type(label).__name__}")
        if tuple(label.shape) != (B, H, W):
            raise ValueError(
                f"label must be (B, H, W) = {(B, H, W)} at the feature grid (downsample "
                f"it with nearest), got {tuple(label.shape)}"
            )
        _validate.same("feat and label", feat, label)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return first_proxy_index(label, B, H * W, generator, feat.device)


def greedy_proxy_sampling(
    feat: torch.Tensor,
    num_proxies: int = 64,
    first=None,
    label=None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
):
    """Greedy "weak cross-correlation" proxies (RA-BUSSeg, CRA; docs/ops.md): (B, M) int64
    distinct pixel indices of ``feat`` (B, C, H, W).

    The first proxy s_0 of image b is ``first[b]`` if given, else a uniform foreground pixel of
    ``label`` (B, H, W), else (no label or no foreground) a uniform pixel, drawn with
    ``generator``. With S(i, j) = scale·<feat_i, feat_j> (scale, a finite float, defaults to
    1/sqrt(C)) and c_t(j) = Σ_{i<t} S(s_i, j)::

        score(j) = max_{t=1..m} c_t(j)      (+inf for pixels already chosen)
        s_m      = argmin_j score(j)        (ties to the smallest index; NaN counts as +inf)

    Only one row of the similarity map is computed per step (O(HW) state). No gradient. Every
    floating dtype (the CPU samples float16 / bfloat16 maps as float32); under torch.autocast it
    samples ``feat`` in its own dtype.
    """
    check_features_and_count(feat, num_proxies)
    s0 = _first_proxies(feat, first, label, generator)
    scale = feat.shape[1] ** -0.5 if scale is None else _validate.real("scale", scale)
    with torch.no_grad():
        return dispatch(OP, feat.device)(feat.detach(), s0, num_proxies, scale)


def _fake(feat, first, num_proxies, scale):
    _validate.one_device(OP.name, feat=feat, first=first)
    return first.new_empty(feat.shape[0], num_proxies)


register(OP, fake=_fake)
