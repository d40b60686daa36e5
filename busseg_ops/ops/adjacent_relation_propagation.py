"""Adjacent relation propagation (ARP, RA-BUSSeg; SPEC §1): public op, fake kernels, autograd."""

from __future__ import annotations

import torch

from . import _validate, reference
from .backends import selected_backend

_ops = torch.ops.busseg


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
    of scaled feature affinities of ``feat`` (B, C, H, W).

    Returns ``out`` (B, K, H, W), and with ``return_weights=True`` also the softmax weights
    (B, k*k, H, W) with taps in row-major order (not differentiable; for visualisation).
    ``padding="zeros"`` (upstream) lets outside neighbours take part with feature and value 0;
    ``"valid"`` excludes them. ``scale`` defaults to 1/sqrt(C).
    """
    _validate.tensor("feat", feat, 4, "(B, C, H, W)")
    _validate.tensor("value", value, 4, "(B, K, H, W)")
    _validate.same("feat and value", feat, value, dims=(0, 2, 3), dtype=True)
    _validate.integer("kernel_size", kernel_size, minimum=1, odd=True)
    _validate.integer("dilation", dilation, minimum=1)
    valid = _validate.choice("padding", padding, ("zeros", "valid")) == "valid"
    scale = feat.shape[1] ** -0.5 if scale is None else float(scale)

    backend = selected_backend(feat.device)
    if backend == "reference":
        out, weights = reference.adjacent_relation_propagation(feat, value, kernel_size, dilation, scale, valid)
    else:
        op = _ops.arp_forward_triton if backend == "triton" else _ops.arp_forward
        out, weights = op(feat, value, kernel_size, dilation, scale, valid)
    return (out, weights) if return_weights else out


def _fake_forward(feat, value, kernel_size, dilation, scale, valid_padding):
    B, _, H, W = feat.shape
    return (value.new_empty(B, value.shape[1], H, W), feat.new_empty(B, kernel_size * kernel_size, H, W))


def _fake_backward(
    grad_out, feat, value, weights, kernel_size, dilation, scale, valid_padding, need_grad_feat, need_grad_value
):
    grad_feat = feat.new_empty(feat.shape) if need_grad_feat else feat.new_empty(0)
    grad_value = value.new_empty(value.shape) if need_grad_value else value.new_empty(0)
    return grad_feat, grad_value


def register_autograd(forward_op: str, backward_op) -> None:
    """Autograd for an ARP forward op whose backward is the registered op ``backward_op``."""

    def setup_context(ctx, inputs, output):
        feat, value, kernel_size, dilation, scale, valid_padding = inputs
        ctx.save_for_backward(feat, value, output[1])
        ctx.params = (kernel_size, dilation, scale, valid_padding)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out, _grad_weights):
        feat, value, weights = ctx.saved_tensors
        need_feat, need_value = ctx.needs_input_grad[:2]
        grad_feat, grad_value = backward_op(grad_out, feat, value, weights, *ctx.params, need_feat, need_value)
        return (grad_feat if need_feat else None, grad_value if need_value else None, None, None, None, None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


torch.library.register_fake("busseg::arp_forward")(_fake_forward)
torch.library.register_fake("busseg::arp_backward")(_fake_backward)
register_autograd("busseg::arp_forward", _ops.arp_backward)
