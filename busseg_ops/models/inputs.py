"""The training pipeline feeds every network (B, 1, H, W) grayscale in [0, 1]. A network built
for 3 input channels (to start from ImageNet weights) converts that inside its own forward, as the
upstream code feeds its ImageNet backbones: the gray channel replicated to RGB, then normalised
with the ImageNet mean and std. The conversion has no weights (nothing in the state dict), so an
exported network is loaded and called on plain grayscale images like any other."""

from __future__ import annotations

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GrayToImageNet(nn.Module):
    """(B, 1, H, W) gray (or (B, 3, H, W) RGB) in [0, 1] → (B, 3, H, W) ImageNet-normalised."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"expected a (B, 1, H, W) gray or (B, 3, H, W) RGB input, got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def input_adapter(in_channels: int, gray_input: bool) -> nn.Module:
    """What a network applies to its input first: the ImageNet conversion when it takes grayscale
    (``gray_input``) but was built for 3 channels; otherwise nothing."""
    if gray_input and in_channels == 3:
        return GrayToImageNet()
    if gray_input and in_channels != 1:
        raise ValueError(f"gray_input: the network must have 1 or 3 input channels, got {in_channels}")
    return nn.Identity()
