"""The training package's default network: a compact ResNet-18-style encoder with a DeepLabv3+
decoder (the papers' architecture, narrower so that it trains on a CPU), plus the heads the
methods need. `width=64` gives the ResNet-18 channel widths; no pretrained weights are downloaded.

forward(x) → dict:
  pred  (B, K, H/4, W/4) logits            feats [layer1..layer4] (strides 4, 8, 16, 16)
  arp   (B, C_arp, H/16, W/16): 3×3 conv projection of the deepest map (RA-BUSSeg ARP features)
  proj  (B, D, H/4, W/4): projector (PH-Net: two Conv-BN-ReLU blocks)
  cls   (B, num_classes) image-level logits (LA-Net / SemiSeg-CAW classification head)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Block(nn.Module):
    """ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = cbr(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False), nn.BatchNorm2d(cout))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return F.relu(self.conv2(self.conv1(x)) + idt)


class SegNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16, depth: int = 1,
                 proj_dim: int = 64, arp_dim: int = 64, cls_classes: int = 2):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(cbr(in_channels, w[0], 3, 2), cbr(w[0], w[0]), nn.MaxPool2d(3, 2, 1))

        def stage(cin, cout, stride, dilation=1):
            return nn.Sequential(Block(cin, cout, stride, dilation), *[Block(cout, cout, 1, dilation) for _ in range(depth - 1)])

        self.layer1 = stage(w[0], w[0], 1)
        self.layer2 = stage(w[0], w[1], 2)
        self.layer3 = stage(w[1], w[2], 2)
        self.layer4 = stage(w[2], w[3], 1, 2)  # output stride 16, dilated as in DeepLabv3+
        a = 2 * width
        self.aspp = nn.ModuleList([cbr(w[3], a, 1), cbr(w[3], a, 3, dilation=2), cbr(w[3], a, 3, dilation=4)])
        self.aspp_pool = cbr(w[3], a, 1)
        self.aspp_out = cbr(4 * a, a, 1)
        self.low = cbr(w[0], width, 1)
        self.fuse = nn.Sequential(cbr(a + width, a), cbr(a, a))
        self.classifier = nn.Conv2d(a, num_classes, 1)
        self.arp_proj = nn.Conv2d(w[3], arp_dim, 3, padding=1)
        self.projector = nn.Sequential(cbr(a, a), nn.Conv2d(a, proj_dim, 1))
        self.cls_head = nn.Linear(w[3], cls_classes)

    def forward(self, x: torch.Tensor) -> dict:
        x0 = self.stem(x)
        f1 = self.layer1(x0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        pooled = F.adaptive_avg_pool2d(f4, 1)
        branches = [m(f4) for m in self.aspp] + [self.aspp_pool(pooled).expand(-1, -1, *f4.shape[2:])]
        y = self.aspp_out(torch.cat(branches, 1))
        y = F.interpolate(y, size=f1.shape[2:], mode="bilinear", align_corners=True)
        y = self.fuse(torch.cat([y, self.low(f1)], 1))
        return {"pred": self.classifier(y), "feats": [f1, f2, f3, f4], "arp": self.arp_proj(f4),
                "proj": self.projector(y), "cls": self.cls_head(pooled.flatten(1))}
