"""ResNet-18/34/50/101 with the deep stem of the RA-BUSSeg / PH-Net / U2PL code, or the torchvision /
timm stems, named so that their ImageNet state dicts load unchanged (docs/methods.md)."""

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
    (after renaming), ignored (the ImageNet ``fc``) and whether the stem kernel was adapted to
    the network's input channels."""

    path: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: str | None = None

    def __str__(self) -> str:
        if self.path is None:
            return "no pretrained file given: random initialisation"
        text = (
            f"{self.path}: loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, ignored {len(self.ignored)}"
        )
        if self.adapted:
            text += f"; {self.adapted}"
        return text + "".join(
            f"\n  {k}: {v[:8]}" for k, v in (("missing", self.missing), ("unexpected", self.unexpected)) if v
        )


# Wrappers around a backbone's names: DataParallel/DDP, U2PL's ModelBuilder (encoder.), ours.
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Containers a checkpoint may keep its state dict under (timm/torchvision training scripts, U2PL).
_CONTAINERS = ("state_dict", "model", "model_state", "teacher_state")


def _rename(key: str) -> str:
    """Strip wrapper prefixes (any order, any number)."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB stem kernel (O, 3, k, k) for ``in_channels`` inputs, as timm's ``adapt_input_conv``:
    1 channel: the sum over the RGB kernels (a gray image replicated to RGB gives the same response);
    other counts: the RGB kernels repeated cyclically and scaled by 3 / in_channels."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"cannot adapt a {weight.shape[1]}-channel stem kernel to {in_channels} channels")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = -(-in_channels // 3)
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (3.0 / in_channels)


# What each stem looks like in a state dict: the hint a mismatch error gives.
_STEM_OF_FILE = {
    "conv1.weight": "plain (torchvision / timm resnetNN: --stem plain)",
    "conv1.0.weight": "deep (U2PL, RA-BUSSeg, PH-Net: --stem deep; timm resnetNNd: --stem timm-d)",
}


class ResNet(nn.Module):
    """``stem``: ``"deep"`` (U2PL / RA-BUSSeg / PH-Net: three 3×3 convs 64-64-128, layer1 from 128
    channels), ``"plain"`` (torchvision, and timm's resnet18/34/50/101: one 7×7 conv to 64) or
    ``"timm-d"`` (timm's resnet18d/34d/50d/101d: deep stem 32-32-64 and average-pool shortcuts;
    at a dilated stage, where timm pads and averages 2×2 at stride 1, the shortcut here has no
    pooling). ``zero_init_residual``: the last BN of every residual branch starts at 0 (each block
    starts as the identity), as upstream's flag. ``multi_grid``: True for upstream's multi-grid
    (layer4 dilations ×(1, 2, 4), i.e. 4-8-16 at output stride 8) or a tuple of factors."""

    def __init__(
        self,
        block,
        layers,
        in_channels: int = 3,
        replace_stride_with_dilation=(False, True, True),
        multi_grid=None,
        pretrained: str | None = None,
        stem: str = "deep",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation: expected 3 booleans (layer2..layer4), "
                f"got {replace_stride_with_dilation!r}"
            )
        if stem not in ("deep", "plain", "timm-d"):
            raise ValueError(f"stem: expected 'deep', 'plain' or 'timm-d', got {stem!r}")
        self.in_channels, self.stem = in_channels, stem
        self.avg_down = stem == "timm-d"
        if stem == "plain":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.inplanes = 64
        else:
            width = 64 if stem == "deep" else 32
            self.conv1 = nn.Sequential(
                conv3x3(in_channels, width, 2),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                conv3x3(width, width),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                conv3x3(width, 2 * width),
            )
            self.inplanes = 2 * width
        self.dilation = 1
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        d = replace_stride_with_dilation
        if multi_grid is True:
            multi_grid = (1, 2, 4)[: layers[3]]
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, d[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, d[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, d[2], multi_grid or None)
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
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)
        self.load_report = self.load_pretrained(pretrained)

    @property
    def stem_key(self) -> str:
        """The state-dict name of the first convolution (the one that sees the input channels)."""
        return "conv1.weight" if self.stem == "plain" else "conv1.0.weight"

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
            conv = nn.Conv2d(self.inplanes, planes * block.expansion, 1, 1 if self.avg_down else stride, bias=False)
            bn = nn.BatchNorm2d(planes * block.expansion)
            if self.avg_down:  # timm "d": average-pool, then a stride-1 1×1 conv (keys downsample.1/.2)
                pool = (
                    nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1
                    else nn.Identity()
                )
                downsample = nn.Sequential(pool, conv, bn)
            else:
                downsample = nn.Sequential(conv, bn)
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
        """Load a local ImageNet state dict (plain, or under ``state_dict`` / ``model`` /
        ``model_state``) with torchvision, timm or U2PL names; wrapper prefixes (``module.``,
        ``encoder.``, ``backbone.``, ``model.``) are stripped and the ImageNet ``fc`` is ignored.
        An RGB stem kernel is adapted to the network's input channels (:func:`adapt_input_conv`).
        Any other tensor whose shape does not fit raises ``ValueError`` (a file for another stem or
        depth would otherwise load half its weights); missing and unexpected keys are reported.
        Read with ``weights_only=True``; nothing is downloaded. ``None`` keeps the random
        initialisation."""
        if path is None:
            return LoadReport()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"load_pretrained: no file at {path!r} (no downloads; a local state dict, or None for random weights)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not a readable state dict ({str(err).splitlines()[0]})") from None
        for k in _CONTAINERS:
            if isinstance(state, dict) and isinstance(state.get(k), dict):
                state = state[k]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
        own = self.state_dict()
        report, fit, wrong = LoadReport(path=path), {}, []
        for key, value in state.items():
            name = _rename(key)
            if name.startswith("fc."):
                report.ignored.append(key)
            elif name not in own:
                report.unexpected.append(key)
            else:
                if name == self.stem_key and value.dim() == 4 and value.shape[1] != self.in_channels:
                    report.adapted = f"{name} adapted from {value.shape[1]} to {self.in_channels} input channels"
                    value = adapt_input_conv(value, self.in_channels)
                if own[name].shape != value.shape:
                    wrong.append(f"{key} is {tuple(value.shape)} in the file, {tuple(own[name].shape)} here")
                else:
                    fit[name] = value
        if wrong:
            stem = next((_STEM_OF_FILE[k] for k in _STEM_OF_FILE if any(_rename(s) == k for s in state)), None)
            hint = f"; the file's stem is {stem}, this network's is {self.stem!r}" if stem else ""
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            raise ValueError(f"{path}: shape mismatch: {wrong[0]}{more}{hint}")
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
    replace_stride_with_dilation=(False, True, True), multi_grid=None, pretrained=None,
    stem="deep", zero_init_residual=False)``."""
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
