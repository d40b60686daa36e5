"""DeepLabv3+ as the UniMatch / CorrMatch / RA-BUSSeg code builds it, with the heads the methods add:
PH-Net's projector and RA-BUSSeg's relation projection (layout: docs/methods.md)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inputs import input_adapter
from .resnet import conv_bn_relu, resnet

HEAD_DROPOUT = 0.1  # Dropout2d after the hidden blocks of upstream's heads


def with_dropout(block: nn.Sequential, p: float) -> nn.Sequential:
    """``block`` followed by Dropout2d(p) inside it (parameter names unchanged); p = 0: as is."""
    if p:
        block.append(nn.Dropout2d(p))
    return block


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=True, the convention of all upstream code."""
    return (
        x
        if tuple(x.shape[-2:]) == tuple(size)
        else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    )


class ASPPPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv_bn_relu(cin, cout, 1)

    def forward(self, x):
        return upsample(self.conv(F.adaptive_avg_pool2d(x, 1)), x.shape[-2:])


class ASPP(nn.Module):
    """1×1 branch, three dilated 3×3 branches, image pooling; concat → 1×1 Conv-BN-ReLU (→ Dropout2d
    with ``dropout``, as upstream's ``head`` after its ASPP)."""

    def __init__(self, cin: int, cout: int, rates=(12, 24, 36), dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)]
            + [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
            + [ASPPPooling(cin, cout)]
        )
        self.project = with_dropout(conv_bn_relu(cout * len(self.branches), cout, 1), dropout)

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class Projector(nn.Module):
    """PH-Net projector: a 3×3 Conv-BN-ReLU block, then a plain 1×1 conv to ``dim`` channels, then
    L2 normalisation over channels. The output layer has no BN/ReLU, as upstream's
    ``representation`` head: after a ReLU every feature is non-negative, no two are further apart
    than 90°, and the contrastive loss cannot separate the classes. (Upstream has a second 3×3
    block at 256 channels; on a full-resolution U-Net feature that would cost 16× this head.)"""

    def __init__(self, cin: int, dim: int = 256, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(with_dropout(conv_bn_relu(cin, hidden, 3), dropout), nn.Conv2d(hidden, dim, 1))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


class SegmentationHeads(nn.Module):
    """The optional heads shared by every segmentation network here, and the output dict.

    ``rep``  PH-Net projector output on the decoder feature (B, rep_dim, h, w), L2-normalised.
    ``proj`` RA-BUSSeg relation head: 3×3 conv deepest→proj_dim + BN + ReLU (CorrMatch's
             ``proj``), the features of ARP and of CRA's proxy sampling (B, proj_dim, h4, w4).
    ``feats`` the four stage maps, shallow → deep (CRA).
    Only what is asked for is computed. ``dropout``: Dropout2d rate after each head's hidden block.
    """

    def __init__(
        self, decoder_channels: int, deep_channels: int, rep_dim: int = 256, proj_dim: int = 256, dropout: float = 0.0
    ):
        super().__init__()
        self.rep_head = Projector(decoder_channels, rep_dim, dropout=dropout) if rep_dim else None
        self.proj_head = with_dropout(conv_bn_relu(deep_channels, proj_dim, 3), dropout) if proj_dim else None

    def outputs(self, logits, size, decoder_feature, feats, need_rep=False, need_proj=False, need_feats=False) -> dict:
        out = {"pred": upsample(logits, size)}
        if need_rep:
            if self.rep_head is None:
                raise ValueError("need_rep=True but the network was built with rep_dim=0")
            out["rep"] = self.rep_head(decoder_feature)
        if need_proj:
            if self.proj_head is None:
                raise ValueError("need_proj=True but the network was built with proj_dim=0")
            out["proj"] = self.proj_head(feats[-1])
        if need_feats:
            out["feats"] = list(feats)
        return out


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ with a deep-stem ResNet encoder.

    ``forward(x, need_rep=False, need_proj=False, need_feats=False, need_fp=False)`` → dict with
    ``pred`` (B, K, H, W) logits at the input resolution, and on request ``rep``, ``proj``,
    ``feats`` (see :class:`SegmentationHeads`) and ``pred_fp`` (UniMatch feature perturbation:
    the decoder run again on Dropout2d(0.5) of stage 1 and stage 4).

    ``gray_input=True``: the network is fed (B, 1, H, W) grayscale in [0, 1] whatever
    ``in_channels`` is; with 3 it replicates and ImageNet-normalises it first (models/inputs.py).
    ``stem`` and ``zero_init_residual`` go to the ResNet (:class:`~.resnet.ResNet`).
    ``dropout``: Dropout2d(0.1) in the decoder and heads, as upstream (module docstring).
    """

    def __init__(
        self,
        num_classes: int = 2,
        backbone: str = "resnet50",
        in_channels: int = 3,
        pretrained: str | None = None,
        dilations=(12, 24, 36),
        replace_stride_with_dilation=(False, True, True),
        multi_grid=None,
        rep_dim: int = 256,
        proj_dim: int = 256,
        gray_input: bool = False,
        stem: str = "deep",
        zero_init_residual: bool = False,
        dropout: bool = True,
    ):
        super().__init__()
        self.input = input_adapter(in_channels, gray_input)
        self.backbone = resnet(
            backbone,
            in_channels=in_channels,
            pretrained=pretrained,
            replace_stride_with_dilation=replace_stride_with_dilation,
            multi_grid=multi_grid,
            stem=stem,
            zero_init_residual=zero_init_residual,
        )
        low, high = self.backbone.channels[0], self.backbone.channels[-1]
        p = HEAD_DROPOUT if dropout else 0.0
        self.aspp = ASPP(high, high // 8, dilations, p)
        self.reduce = conv_bn_relu(low, 48, 1)
        self.fuse = nn.Sequential(
            with_dropout(conv_bn_relu(high // 8 + 48, 256, 3), p), with_dropout(conv_bn_relu(256, 256, 3), p)
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.heads = SegmentationHeads(high // 8 + 48, high, rep_dim, proj_dim, p)

    def decode(self, c1, c4):
        """Decoder input feature (stage-1 grid, 48 + ASPP channels) and the logits at that grid."""
        feature = torch.cat([self.reduce(c1), upsample(self.aspp(c4), c1.shape[-2:])], dim=1)
        return feature, self.classifier(self.fuse(feature))

    def forward(
        self, x, need_rep: bool = False, need_proj: bool = False, need_feats: bool = False, need_fp: bool = False
    ) -> dict:
        feats = self.backbone(self.input(x))
        c1, c4 = feats[0], feats[-1]
        if need_fp:
            drop = nn.functional.dropout2d
            feature, logits = self.decode(
                torch.cat([c1, drop(c1, 0.5, self.training)]), torch.cat([c4, drop(c4, 0.5, self.training)])
            )
            feature, logits_fp = feature[: x.shape[0]], logits[x.shape[0] :]
            logits = logits[: x.shape[0]]
        else:
            feature, logits = self.decode(c1, c4)
        out = self.heads.outputs(logits, x.shape[-2:], feature, feats, need_rep, need_proj, need_feats)
        if need_fp:
            out["pred_fp"] = upsample(logits_fp, x.shape[-2:])
        return out
