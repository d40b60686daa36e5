"""UNeXt (Valanarasu & Patel, MICCAI 2022), SemiSeg-CAW's second backbone, written from the paper
and its public code with the public attribute names, so that its state dict loads unchanged
(layout and our deviations: docs/methods.md)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deeplab import HEAD_DROPOUT, SegmentationHeads
from .inputs import input_adapter
from .malunet import init_like_upstream

SHIFT_GROUPS = 5  # the public shift_size: groups shifted by -2..2 pixels


def to_image(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H·W, C) row-major tokens → (B, C, H, W), contiguous (as the public code's .contiguous();
    a strided view would make torch.export guard on the memory format, size by size)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C)."""
    return x.flatten(2).transpose(1, 2)


def shift_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, C, H, W): channel group g of torch.chunk(x, 5, 1) moved by g − 2 pixels along `dim`
    (2: H, 3: W), zeros shifted in."""
    pad = SHIFT_GROUPS // 2
    groups = torch.chunk(x, SHIFT_GROUPS, dim=1)
    if len(groups) != SHIFT_GROUPS:  # the public zip would silently drop channels
        raise ValueError(f"shifted MLP: {x.shape[1]} channels do not make {SHIFT_GROUPS} groups")
    size = x.shape[dim]
    padding = (0, 0, pad, pad) if dim == 2 else (pad, pad)
    out = []
    for g, part in enumerate(groups):
        s = g - pad  # out[i] = part[i − s]
        out.append(F.pad(part, padding).narrow(dim, pad - s, size))
    return torch.cat(out, dim=1)


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens, h, w):
        return to_tokens(self.dwconv(to_image(tokens, h, w)))


class ShiftedMLP(nn.Module):
    """shift along H → fc1 → depthwise conv → GELU → shift along W → fc2 (hidden = dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.dwconv = DWConv(dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, tokens, h, w):
        y = self.fc1(to_tokens(shift_groups(to_image(tokens, h, w), 2)))
        y = self.act(self.dwconv(y, h, w))
        return self.fc2(to_tokens(shift_groups(to_image(y, h, w), 3)))


class ShiftedBlock(nn.Module):
    """tokens + ShiftedMLP(LayerNorm(tokens))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ShiftedMLP(dim)

    def forward(self, tokens, h, w):
        return tokens + self.mlp(self.norm2(tokens), h, w)


class OverlapPatchEmbed(nn.Module):
    """3×3 stride-2 conv (padding 1) → tokens → LayerNorm."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(to_tokens(x)), x.shape[2], x.shape[3]


class UNeXt(nn.Module):
    """``forward(x, need_rep=False, need_proj=False, need_feats=False)`` → dict like
    :class:`UNet` (``pred`` logits at the input size). Defaults: the public config."""

    CONV = (16, 32, 128)  # the public conv stages
    TOKEN = (160, 256)  # embed_dims[1:], the tokenised-MLP stages

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 3,
        rep_dim: int = 0,
        proj_dim: int = 0,
        gray_input: bool = False,
        dropout: bool = False,
    ):
        super().__init__()
        (c1, c2, c3), (d4, d5) = self.CONV, self.TOKEN
        self.input = input_adapter(in_channels, gray_input)
        self.channels, self.strides = [c2, c3, d4, d5], [4, 8, 16, 32]  # the ``feats`` maps
        self.encoder1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.encoder2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.encoder3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.ebn1, self.ebn2, self.ebn3 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm2d(c3)
        self.norm3, self.norm4 = nn.LayerNorm(d4), nn.LayerNorm(d5)
        self.dnorm3, self.dnorm4 = nn.LayerNorm(d4), nn.LayerNorm(c3)
        self.block1 = nn.ModuleList([ShiftedBlock(d4)])
        self.block2 = nn.ModuleList([ShiftedBlock(d5)])
        self.dblock1 = nn.ModuleList([ShiftedBlock(d4)])
        self.dblock2 = nn.ModuleList([ShiftedBlock(c3)])
        self.patch_embed3 = OverlapPatchEmbed(c3, d4)
        self.patch_embed4 = OverlapPatchEmbed(d4, d5)
        self.decoder1 = nn.Conv2d(d5, d4, 3, padding=1)
        self.decoder2 = nn.Conv2d(d4, c3, 3, padding=1)
        self.decoder3 = nn.Conv2d(c3, c2, 3, padding=1)
        self.decoder4 = nn.Conv2d(c2, c1, 3, padding=1)
        self.decoder5 = nn.Conv2d(c1, c1, 3, padding=1)
        self.dbn1, self.dbn2, self.dbn3, self.dbn4 = (nn.BatchNorm2d(c) for c in (d4, c3, c2, c1))
        self.final = nn.Conv2d(c1, num_classes, 1)
        # The public code re-initialises only inside its token modules (the plain convs, BN and the
        # classifier keep PyTorch's defaults; LayerNorm's default is its 1/0).
        for m in (self.block1, self.block2, self.dblock1, self.dblock2, self.patch_embed3, self.patch_embed4):
            m.apply(init_like_upstream)
        self.heads = SegmentationHeads(c1, d5, rep_dim, proj_dim, HEAD_DROPOUT if dropout else 0.0)

    @staticmethod
    def _tokens_stage(tokens, h, w, blocks, norm):
        for blk in blocks:
            tokens = blk(tokens, h, w)
        return to_image(norm(tokens), h, w)

    @staticmethod
    def _up(x, like):
        """Bilinear resize (align_corners=False, as the public ×2) to `like`'s size."""
        return F.interpolate(x, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False)

    def forward(self, x, need_rep: bool = False, need_proj: bool = False, need_feats: bool = False) -> dict:
        x = self.input(x)
        t1 = F.relu(F.max_pool2d(self.ebn1(self.encoder1(x)), 2, 2))
        t2 = F.relu(F.max_pool2d(self.ebn2(self.encoder2(t1)), 2, 2))
        t3 = F.relu(F.max_pool2d(self.ebn3(self.encoder3(t2)), 2, 2))
        t4 = self._tokens_stage(*self.patch_embed3(t3), self.block1, self.norm3)
        bottleneck = self._tokens_stage(*self.patch_embed4(t4), self.block2, self.norm4)

        y = F.relu(self._up(self.dbn1(self.decoder1(bottleneck)), t4)) + t4
        y = self._tokens_stage(to_tokens(y), *y.shape[-2:], self.dblock1, self.dnorm3)
        y = F.relu(self._up(self.dbn2(self.decoder2(y)), t3)) + t3
        y = self._tokens_stage(to_tokens(y), *y.shape[-2:], self.dblock2, self.dnorm4)
        y = F.relu(self._up(self.dbn3(self.decoder3(y)), t2)) + t2
        y = F.relu(self._up(self.dbn4(self.decoder4(y)), t1)) + t1
        y = F.relu(self._up(self.decoder5(y), x))
        feats = [t2, t3, t4, bottleneck]
        return self.heads.outputs(self.final(y), x.shape[-2:], y, feats, need_rep, need_proj, need_feats)
