"""ResNet-18/50/101 with the deep stem of the RA-BUSSeg / PH-Net / UniMatch code.

Stem: conv3x3(in, 64, stride 2)-BN-ReLU, conv3x3(64, 64)-BN-ReLU, conv3x3(64, 128), then ``bn1``,
ReLU and a 3×3/2 max-pool; layer1 starts from 128 channels. Module names follow the upstream
code (``conv1`` is a Sequential: ``conv1.0``, ``conv1.1``, ``conv1.3``, ``conv1.4``, ``conv1.6``;
``bn1``; ``layer1..4``), so their deep-stem ImageNet checkpoints load unchanged, and every
torchvision name outside the stem matches too.

``replace_stride_with_dilation=(False, True, True)`` (default) gives output stride 8; the forward
returns the four stage maps ``[c1, c2, c3, c4]`` (stride 4, 8, 8, 8 by default). ``multi_grid``
multiplies the dilation of each layer4 block (DeepLabv3's (1, 2, 4)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → BN → ReLU, the unit every head here is built from."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: keys loaded, missing from the file, unexpected in the file
    (after renaming), present with the wrong shape (skipped), and ignored (ImageNet ``fc``)."""

    path: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.path is None:
            return "no pretrained file given: random initialisation"
        return (
            f"{self.path}: loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected "
            f"{len(self.unexpected)}, shape-mismatched {len(self.mismatched)}, ignored "
            f"{len(self.ignored)}"
            + "".join(
                f"\n  {k}: {v[:8]}"
                for k, v in (
                    ("missing", self.missing),
                    ("unexpected", self.unexpected),
                    ("mismatched", self.mismatched),
                )
                if v
            )
        )


_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


def _rename(key: str) -> str:
    """torchvision / DataParallel / wrapper names → ours: strip wrapper prefixes."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


class ResNet(nn.Module):
    def __init__(
        self,
        block,
        layers,
        in_channels: int = 3,
        replace_stride_with_dilation=(False, True, True),
        multi_grid=None,
        pretrained: str | None = None,
    ):
        super().__init__()
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation: expected 3 booleans (layer2..layer4), "
                f"got {replace_stride_with_dilation!r}"
            )
        self.inplanes, self.dilation = 128, 1
        self.conv1 = nn.Sequential(
            conv3x3(in_channels, 64, 2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            conv3x3(64, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            conv3x3(64, 128),
        )
        self.bn1 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        d = replace_stride_with_dilation
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, d[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, d[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, d[2], multi_grid)
        self.channels = [64 * block.expansion * 2**i for i in range(4)]
        self.strides = [4]
        for dil in d:
            self.strides.append(self.strides[-1] * (1 if dil else 2))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.load_report = self.load_pretrained(pretrained)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False, multi_grid=None):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        grid = tuple(multi_grid) if multi_grid else (1,) * blocks
        if len(grid) != blocks:
            raise ValueError(f"multi_grid: expected {blocks} factors (one per layer4 block), got {grid!r}")
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # torchvision: the first block keeps the previous dilation; with a multi-grid every block
        # gets dilation × its grid factor (DeepLabv3: 4 × (1, 2, 4) at output stride 8).
        first = self.dilation * grid[0] if multi_grid else previous_dilation
        layers = [block(self.inplanes, planes, stride, downsample, dilation=first)]
        self.inplanes = planes * block.expansion
        for g in grid[1:]:
            layers.append(block(self.inplanes, planes, dilation=self.dilation * g))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def load_pretrained(self, path: str | None) -> LoadReport:
        """Load a local ImageNet state dict (a plain state dict or one under ``state_dict`` /
        ``model``). Wrapper prefixes (``module.``, ``backbone.``) are stripped, the ImageNet ``fc``
        is ignored, keys whose shape does not fit (e.g. torchvision's plain-stem ``bn1`` or
        ``layer1.0.conv1`` from 64 channels) are skipped. Everything is reported; nothing is
        downloaded. ``path=None`` keeps the random initialisation."""
        if path is None:
            return LoadReport()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"load_pretrained: no file at {path!r} (no downloads; pass a local "
                "state dict or None for random initialisation)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(k), dict):
                state = state[k]
        own = self.state_dict()
        report, fit = LoadReport(path=path), {}
        for key, value in state.items():
            name = _rename(key)
            if name.startswith("fc."):
                report.ignored.append(key)
            elif name not in own:
                report.unexpected.append(key)
            elif own[name].shape != value.shape:
                report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(own[name].shape)}")
            else:
                fit[name] = value
        self.load_state_dict(fit, strict=False)
        report.loaded = sorted(fit)
        report.missing = [k for k in own if k not in fit and not k.endswith("num_batches_tracked")]
        self.load_report = report
        return report


_SPECS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


def resnet(name: str = "resnet50", **kwargs) -> ResNet:
    """``resnet("resnet18"|"resnet34"|"resnet50"|"resnet101", in_channels=3,
    replace_stride_with_dilation=(False, True, True), multi_grid=None, pretrained=None)``."""
    if name not in _SPECS:
        raise ValueError(f"backbone: expected one of {sorted(_SPECS)}, got {name!r}")
    block, layers = _SPECS[name]
    return ResNet(block, layers, **kwargs)


def resnet18(**kw):
    return resnet("resnet18", **kw)


def resnet50(**kw):
    return resnet("resnet50", **kw)


def resnet101(**kw):
    return resnet("resnet101", **kw)
