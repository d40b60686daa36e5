"""LA-Net (Fan et al., MedIA 2023): feature extractor + lesion-aware network + attention classifier
for joint lesion localisation and classification; the paper leaves the layers open, our choices
are in docs/methods.md."""

from __future__ import annotations

import torch
import torch.nn as nn

from .deeplab import upsample
from .inputs import input_adapter
from .resnet import conv_bn_relu, resnet
from .unet import UNetEncoder


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.mlp(avg) + self.mlp(mx))


class SpatialGate(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(2, hidden), conv_bn_relu(hidden, hidden), nn.Conv2d(hidden, 1, 3, padding=1)
        )

    def forward(self, x):
        desc = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.body(desc))


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate()

    def forward(self, x):
        return self.spatial(self.channel(x))


class LesionAwareNet(nn.Module):
    """The LA-Net proper: CBAM per level + squeeze + fusion → mask logits at the deepest grid."""

    def __init__(self, channels, reduction: int = 16):
        super().__init__()
        self.cbam = nn.ModuleList([CBAM(c, reduction) for c in channels])
        self.squeeze = nn.ModuleList([nn.Conv2d(c, 1, 3, padding=1) for c in channels])
        self.fuse = nn.Sequential(nn.Conv2d(len(channels), 1, 3, padding=1, bias=False), nn.BatchNorm2d(1))

    def forward(self, feats):
        size = feats[-1].shape[-2:]
        merged = torch.cat([upsample(sq(cbam(f)), size) for f, cbam, sq in zip(feats, self.cbam, self.squeeze)], 1)
        return self.fuse(merged)


class LANet(nn.Module):
    """Joint localisation + classification. ``backbone``: "resnet18/34/50/101" or "unet";
    ``gray_input``, ``stem``, ``multi_grid`` and ``zero_init_residual`` as in :class:`DeepLabV3Plus`."""

    def __init__(
        self,
        num_classes: int = 2,
        backbone: str = "resnet50",
        in_channels: int = 3,
        pretrained: str | None = None,
        replace_stride_with_dilation=(False, False, False),
        reduction: int = 16,
        unet_base: int = 16,
        gray_input: bool = False,
        stem: str = "deep",
        multi_grid=None,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.input = input_adapter(in_channels, gray_input)
        if backbone == "unet":
            if pretrained is not None:
                raise ValueError("pretrained: the U-Net backbone has no ImageNet weights")
            self.backbone = UNetEncoder(in_channels, unet_base)
            channels = self.backbone.channels
        else:
            self.backbone = resnet(
                backbone,
                in_channels=in_channels,
                pretrained=pretrained,
                replace_stride_with_dilation=replace_stride_with_dilation,
                multi_grid=multi_grid,
                stem=stem,
                zero_init_residual=zero_init_residual,
            )
            channels = self.backbone.channels
        self.lanet = LesionAwareNet(channels, reduction)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x, need_feats: bool = False) -> dict:
        feats = self.backbone(self.input(x))
        if isinstance(self.backbone, UNetEncoder):
            feats = feats[1:]  # the four strided maps
        mask_logits = self.lanet(feats)
        f = feats[-1]
        attended = f + f * torch.sigmoid(mask_logits)
        logits_full = upsample(mask_logits, x.shape[-2:])
        out = {
            "mask_logits": logits_full,
            "mask": torch.sigmoid(logits_full),
            "cls": self.fc(attended.mean(dim=(2, 3))),
        }
        if need_feats:
            out["feats"] = feats
        return out
