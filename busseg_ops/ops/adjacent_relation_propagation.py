"""adjacent_relation_propagation: RA-BUSSeg's adjacent relation propagation (ARP) module.
Public function, fake kernels and autograd of ``busseg::adjacent_relation_propagation``."""

from __future__ import annotations

import torch

from .. import _validate
from ..backends import Op, autocast_inputs, dispatch, register
from ..reference.adjacent_relation_propagation import adjacent_relation_propagation as _reference

# Under autocast it runs in the autocast dtype (like a convolution: its sums are in float anyway).
OP = Op("adjacent_relation_propagation", reference=_reference, autocast="lower")

# ---- contract: the arguments of busseg::adjacent_relation_propagation and its backward ----------
# Checked by the public function, the fake kernels and the Triton launchers alike; csrc/
# adjacent_relation_propagation/checks.h guards direct calls of the C++ kernels with the same limits
# (tests/test_adjacent_relation_propagation.py pins them to these).

#: kernel_size² taps stay below 2^30.
MAX_KERNEL_SIZE = 32767


def check_args(feat, value, kernel_size, dilation, allow_empty=False) -> None:
    """``feat`` (B, C, H, W) and ``value`` (B, K, H, W) of one floating dtype and device, H and W
    at most 2^30; ``kernel_size`` odd in [1, MAX_KERNEL_SIZE]; ``dilation`` >= 1 with the reach
    ``dilation * (kernel_size // 2)`` at most 2^30 (neighbour coordinates fit in 32 bits). Empty
    tensors only with ``allow_empty`` (the ops compute nothing; the public function refuses them)."""
    _validate.tensor("feat", feat, 4, "(B, C, H, W)", allow_empty=allow_empty)
    _validate.tensor("value", value, 4, "(B, K, H, W)", allow_empty=allow_empty)
    _validate.same("feat and value", feat, value, dims=(0, 2, 3), dtype=True)
    _, _, H, W = feat.shape
    if H > _validate.MAX_EXTENT or W > _validate.MAX_EXTENT:
        raise ValueError(f"feat's H and W must be <= {_validate.MAX_EXTENT}, got shape {tuple(feat.shape)}")
    _validate.integer("kernel_size", kernel_size, minimum=1, odd=True, maximum=MAX_KERNEL_SIZE)
    _validate.integer("dilation", dilation, minimum=1)
    if dilation * (kernel_size // 2) > _validate.MAX_EXTENT:
        raise ValueError(
            f"dilation * (kernel_size // 2) (the neighbours' reach) must be <= {_validate.MAX_EXTENT}, got dilation "
            f"{dilation} with kernel_size {kernel_size}"
        )


def check_backward_args(grad_out, feat, value, weights, kernel_size, dilation) -> None:
    """The forward's arguments (empty ones allowed), ``grad_out`` (B, K, H, W) and ``weights``
    (B, k*k, H, W), all of feat's dtype and device."""
    check_args(feat, value, kernel_size, dilation, allow_empty=True)
    B, _, H, W = feat.shape
    for name, t, shape, layout in (
        ("grad_out", grad_out, (B, value.shape[1], H, W), "(B, K, H, W)"),
        ("weights", weights, (B, kernel_size * kernel_size, H, W), "(B, k*k, H, W)"),
    ):
        _validate.tensor(name, t, 4, layout, allow_empty=True)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {layout} = {shape}, got {tuple(t.shape)}")
        _validate.same(f"feat and {name}", feat, t, dtype=True)


def adjacent_relation_propagation(
    feat: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    scale: float | None = None,
    padding: str = "zeros",
    return_weights: bool = False,
):
    """Propagate ``value`` (B, K, H, W) over each pixel's k×k neighbourhood, weighted by the softmax
    of scaled feature affinities of ``feat`` (B, C, H, W) (RA-BUSSeg, ARP; docs/ops.md).

    For pixel p and offset o in {-r..r}² (r = (k-1)/2, row-major: dy outer, dx inner) with
    neighbour q = p + dilation·o::

        a[p, o]   = scale · <feat[:, p], feat[:, q]>
        w[p, ·]   = softmax over the k² offsets of a[p, ·]
        out[:, p] = Σ_o w[p, o] · value[:, q]

    Returns ``out`` (B, K, H, W), and with ``return_weights=True`` also the softmax weights
    (B, k*k, H, W) with taps in row-major order (not differentiable; for visualisation).
    ``padding="zeros"`` (upstream) lets outside neighbours take part with feature and value 0;
    ``"valid"`` excludes them. ``scale`` (a finite float) defaults to 1/sqrt(C). Gradients flow to ``feat`` (as
    query and as key) and to ``value``; the unfolded (B, C·k², HW) features never exist.
    Every floating dtype; float16 / bfloat16 are summed in float32. Under torch.autocast both
    inputs are cast to the autocast dtype.
    """
    feat, value = autocast_inputs(OP, feat, value)
    check_args(feat, value, kernel_size, dilation)
    valid = _validate.choice("padding", padding, ("zeros", "valid")) == "valid"
    scale = feat.shape[1] ** -0.5 if scale is None else _validate.real("scale", scale)
    out, weights = dispatch(OP, feat.device)(feat, value, kernel_size, dilation, scale, valid)
    return (out, weights) if return_weights else out


def _fake(feat, value, kernel_size, dilation, scale, valid_padding):
    check_args(feat, value, kernel_size, dilation, allow_empty=True)
    B, _, H, W = feat.shape
    return value.new_empty(B, value.shape[1], H, W), feat.new_empty(B, kernel_size * kernel_size, H, W)


def _fake_backward(
    grad_out, feat, value, weights, kernel_size, dilation, scale, valid_padding, need_grad_feat, need_grad_value
):
    check_backward_args(grad_out, feat, value, weights, kernel_size, dilation)
    grad_feat = feat.new_empty(feat.shape) if need_grad_feat else feat.new_empty(0)
    grad_value = value.new_empty(value.shape) if need_grad_value else value.new_empty(0)
    return grad_feat, grad_value


def _setup_context(ctx, inputs, output):
    feat, value, kernel_size, dilation, scale, valid_padding = inputs
    ctx.save_for_backward(feat, value, output[1])
    ctx.params = (kernel_size, dilation, scale, valid_padding)
    ctx.mark_non_differentiable(output[1])


def _backward(backward_op):
    def backward(ctx, grad_out, _grad_weights):
        feat, value, weights = ctx.saved_tensors
        need_feat, need_value = ctx.needs_input_grad[:2]
        grad_feat, grad_value = backward_op(grad_out, feat, value, weights, *ctx.params, need_feat, need_value)
        return (grad_feat if need_feat else None, grad_value if need_value else None, None, None, None, None)

    return backward


register(OP, fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward)
