"""The SSL4MIS U-Net of PH-Net's comparison code, with the outputs and heads of DeepLabV3Plus, so that
every method runs on it (layout and dropout: docs/methods.md)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deeplab import HEAD_DROPOUT, SegmentationHeads, upsample
from .inputs import input_adapter
from .resnet import conv_bn_relu

ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)  # SSL4MIS U-Net, full resolution → deepest
REP_STRIDES = (8, 4, 2, 1)  # the decoder's outputs, first to last


def double_conv(cin: int, cout: int, dropout: float = 0.0) -> nn.Sequential:
    """Two 3×3 Conv-BN-ReLU; with ``dropout`` > 0 a Dropout after the first (inside its block,
    so the parameter names are the same with and without)."""
    first = conv_bn_relu(cin, cout)
    if dropout:
        first.append(nn.Dropout(dropout))
    return nn.Sequential(first, conv_bn_relu(cout, cout))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1)
        self.conv = double_conv(2 * cskip, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, upsample(self.reduce(x), skip.shape[-2:])], dim=1))


class UNetEncoder(nn.Module):
    """Returns the five encoder maps (strides 1, 2, 4, 8, 16); ``channels``/``strides`` describe
    the four strided ones, the "stage maps". ``dropout``: one rate per block (five), or None."""

    def __init__(self, in_channels: int = 3, base: int = 16, dropout=None):
        super().__init__()
        ch = [base * 2**i for i in range(5)]
        rates = dropout or (0.0,) * 5
        self.channels, self.strides = ch[1:], [2, 4, 8, 16]
        self.inc = double_conv(in_channels, ch[0], rates[0])
        self.down = nn.ModuleList([double_conv(ch[i], ch[i + 1], rates[i + 1]) for i in range(4)])

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2, ceil_mode=True)))
        return skips


class UNet(nn.Module):
    """``forward(x, need_rep=False, need_proj=False, need_feats=False)`` → dict like
    :class:`DeepLabV3Plus` (``pred`` at the input resolution; ``gray_input`` as there).
    ``rep_stride``: the decoder level whose feature PH-Net's projector reads (1, 2, 4 or 8 pixels
    per feature). 4 is upstream's: its projector reads the DeepLab decoder feature at a quarter of
    the input; at 1 the projector costs 16× the pixels (docs/methods.md)."""

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        base: int = 16,
        rep_dim: int = 256,
        proj_dim: int = 256,
        gray_input: bool = False,
        dropout: bool = True,
        encoder_dropout: bool = False,
        rep_stride: int = 4,
    ):
        super().__init__()
        if rep_stride not in REP_STRIDES:
            raise ValueError(f"rep_stride must be one of {REP_STRIDES} (a decoder level), got {rep_stride!r}")
        self.rep_level = REP_STRIDES.index(rep_stride)  # decoder outputs from the deepest: strides 8, 4, 2, 1
        self.input = input_adapter(in_channels, gray_input)
        ch = [base * 2**i for i in range(5)]
        self.encoder = UNetEncoder(in_channels, base, ENCODER_DROPOUT if encoder_dropout else None)
        self.up = nn.ModuleList([UpBlock(ch[i + 1], ch[i], ch[i]) for i in reversed(range(4))])
        # no parameters: the names are the same with and without
        self.classifier_dropout = nn.Dropout2d(HEAD_DROPOUT) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(ch[0], num_classes, 1)
        rep_channels = ch[3 - self.rep_level]
        self.heads = SegmentationHeads(rep_channels, ch[4], rep_dim, proj_dim, HEAD_DROPOUT if dropout else 0.0)

    def forward(self, x, need_rep: bool = False, need_proj: bool = False, need_feats: bool = False) -> dict:
        skips = self.encoder(self.input(x))
        decoded = [skips[-1]]
        for up, skip in zip(self.up, reversed(skips[:-1])):
            decoded.append(up(decoded[-1], skip))
        y = decoded[-1]
        return self.heads.outputs(
            self.classifier(self.classifier_dropout(y)),
            x.shape[-2:],
            decoded[1 + self.rep_level],
            skips[1:],
            need_rep,
            need_proj,
            need_feats,
        )
