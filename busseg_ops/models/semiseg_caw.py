"""SemiSeg-CAW (Barzegar & Khan 2025): class-level guidance (ClassElevateSeg) and adaptive loss weights
(WGM). The paper gives the stages, not the layers: our design choices are in docs/methods.md."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .deeplab import DeepLabV3Plus
from .inputs import input_adapter
from .malunet import MALUNet
from .unet import UNet
from .unext import UNeXt

ARCHS = {"deeplab": DeepLabV3Plus, "unet": UNet, "malunet": MALUNet, "unext": UNeXt}


def stage_channels(net: nn.Module) -> list:
    """Channels of the four ``feats`` maps of a segmentation network here, shallow → deep."""
    if isinstance(net, DeepLabV3Plus):
        return net.backbone.channels
    if isinstance(net, UNet):
        return net.encoder.channels
    return net.channels


class SegClassNet(nn.Module):
    """Segmentation network + GAP/FC classifier on the deepest stage map.
    ``forward(x, **flags)`` → the segmentation dict plus ``cls`` (B, num_labels). ``arch``:
    deeplab, unet, or the paper's backbones malunet and unext (their deepest map: the bottleneck)."""

    def __init__(
        self, num_classes: int = 2, num_labels: int = 2, arch: str = "deeplab", in_channels: int = 3, **kwargs
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {', '.join(map(repr, ARCHS))}, got {arch!r}")
        self.seg = ARCHS[arch](num_classes, in_channels=in_channels, **kwargs)
        self.fc = nn.Linear(stage_channels(self.seg)[-1], num_labels)

    def forward(self, x, need_feats: bool = False, **flags) -> dict:
        out = self.seg(x, need_feats=True, **flags)
        out["cls"] = self.fc(out["feats"][-1].mean(dim=(2, 3)))
        if not need_feats:
            del out["feats"]
        return out


class ClassElevateSeg(SegClassNet):
    """Stage-1 auxiliary network; adds ``aux`` = foreground probability (B, 1, H, W)."""

    def forward(self, x, **flags) -> dict:
        out = super().forward(x, **flags)
        out["aux"] = 1 - torch.softmax(out["pred"], dim=1)[:, :1]
        return out


class SemiSegCAW(nn.Module):
    """Main network guided by ClassElevateSeg (concatenated guide channel). ``forward(x)`` →
    ``pred``, ``cls`` of the main network, ``aux`` (the guide used) and, when the auxiliary net is
    trained jointly, ``aux_pred`` / ``aux_cls``. ``forward_aux(x)`` (or ``forward(x, aux_only=True)``): the
    auxiliary network alone (its stage-1 training). ``gray_input`` as in :class:`DeepLabV3Plus`, applied once, before
    both networks. ``guide=False`` (the paper's ablation "removing ClassElevateSeg"): no auxiliary
    network, the main network takes the image alone (``aux`` is None)."""

    def __init__(
        self,
        num_classes: int = 2,
        num_labels: int = 2,
        arch: str = "deeplab",
        in_channels: int = 3,
        aux: ClassElevateSeg | None = None,
        freeze_aux: bool = True,
        gray_input: bool = False,
        guide: bool = True,
        **kwargs,
    ):
        super().__init__()
        if aux is not None and not guide:
            raise ValueError("aux: given, but guide=False builds no auxiliary network")
        self.input = input_adapter(in_channels, gray_input)
        if guide:
            self.aux = aux if aux is not None else ClassElevateSeg(num_classes, num_labels, arch, in_channels, **kwargs)
        else:
            self.aux = None
        self.main = SegClassNet(num_classes, num_labels, arch, in_channels + guide, **kwargs)
        self.freeze_aux = freeze_aux and guide
        if self.freeze_aux:
            self.aux.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_aux:
            self.aux.eval()
        return self

    def forward_aux(self, x, **flags) -> dict:
        if self.aux is None:
            raise ValueError("forward_aux: this SemiSegCAW was built with guide=False (no ClassElevateSeg)")
        return self.aux(self.input(x), **flags)

    def forward(self, x, aux_only: bool = False, **flags) -> dict:
        if aux_only:
            return self.forward_aux(x, **flags)
        x = self.input(x)
        if self.aux is None:
            return self.main(x, **flags)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_aux):
            aux = self.aux(x)
        out = self.main(torch.cat([x, aux["aux"]], dim=1), **flags)
        out["aux"] = aux["aux"]
        if not self.freeze_aux:
            out["aux_pred"], out["aux_cls"] = aux["pred"], aux["cls"]
        return out


class WeightGenerationModule(nn.Module):
    """Trainable, always-positive weights for ``num_losses`` task losses.
    ``forward(losses)`` → (total, weights): total = Σ exp(−s_i)·L_i + s_i over the losses that are
    not None, weights = exp(−s) (detached, for logging)."""

    def __init__(self, num_losses: int, init_log_var: float = 0.0):
        super().__init__()
        if num_losses < 1:
            raise ValueError(f"num_losses: expected ≥ 1, got {num_losses}")
        self.log_vars = nn.Parameter(torch.full((num_losses,), float(init_log_var)))

    def forward(self, losses: Sequence[torch.Tensor | None]):
        if len(losses) != self.log_vars.numel():
            raise ValueError(f"losses: expected {self.log_vars.numel()} task losses, got {len(losses)}")
        present = torch.tensor([l is not None for l in losses], device=self.log_vars.device)
        if not present.any():
            raise ValueError("losses: every task loss is None")
        stacked = torch.stack(
            [
                torch.as_tensor(
                    0.0 if l is None else l, dtype=self.log_vars.dtype, device=self.log_vars.device
                ).reshape(())
                for l in losses
            ]
        )
        weights = torch.exp(-self.log_vars)
        # an absent task (None) adds nothing, not even its s_i (which would otherwise fall for ever)
        return torch.where(present, weights * stacked + self.log_vars, 0.0).sum(), weights.detach()
