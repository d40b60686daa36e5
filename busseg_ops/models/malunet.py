"""MALUNet (Ruan et al., BIBM 2022), SemiSeg-CAW's lighter backbone, written from the paper and its
public code with the public attribute names, so that its state dict loads unchanged (layout and our
deviations: docs/methods.md)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deeplab import HEAD_DROPOUT, SegmentationHeads, upsample
from .inputs import input_adapter

CHANNELS = (8, 16, 24, 32, 48, 64)  # the public config's c_list


def init_like_upstream(m: nn.Module) -> None:
    """The public _init_weights: Linear truncated normal (std 0.02), convs He-normal on fan-out
    (Conv1d: k·out; Conv2d: k²·out / groups), biases 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        fan_out = math.prod(m.kernel_size) * m.out_channels // (m.groups if isinstance(m, nn.Conv2d) else 1)
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DepthWiseConv2d(nn.Module):
    """Depthwise k×k conv → GroupNorm(4) → pointwise 1×1 conv."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, kernel_size, padding=padding, groups=cin)
        self.norm_layer = nn.GroupNorm(4, cin)
        self.conv2 = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv2(self.norm_layer(self.conv1(x)))


class GatedAttentionUnit(nn.Module):
    """GELU(DW(σ(DW₃(x)) · GELU(DW₅(x)))) + 1×1(x)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__()
        self.w1 = nn.Sequential(DepthWiseConv2d(cin, cin, kernel_size, kernel_size // 2), nn.Sigmoid())
        self.w2 = nn.Sequential(DepthWiseConv2d(cin, cin, kernel_size + 2, (kernel_size + 2) // 2), nn.GELU())
        self.wo = nn.Sequential(DepthWiseConv2d(cin, cout, kernel_size), nn.GELU())
        self.cw = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.wo(self.w1(x) * self.w2(x)) + self.cw(x)


class DilatedGatedAttention(nn.Module):
    """Four channel quarters through depthwise 3×3 convs of dilation 7, 5, 2, 1, concatenated,
    GroupNorm → 1×1 → GELU, then the gated attention unit to ``cout`` channels."""

    DILATIONS = (7, 5, 2, 1)

    def __init__(self, cin: int, cout: int):
        super().__init__()
        q = cin // 4
        for i, d in enumerate(self.DILATIONS):  # mda0..mda3, the public names
            setattr(self, f"mda{i}", nn.Conv2d(q, q, 3, padding=d, dilation=d, groups=q))
        self.norm_layer = nn.GroupNorm(4, cin)
        self.conv = nn.Conv2d(cin, cin, 1)
        self.gau = GatedAttentionUnit(cin, cout, 3)

    def forward(self, x):
        parts = torch.chunk(x, 4, dim=1)
        x = torch.cat([getattr(self, f"mda{i}")(p) for i, p in enumerate(parts)], dim=1)
        return self.gau(F.gelu(self.conv(self.norm_layer(x))))


class EAblock(nn.Module):
    """External attention (Guo et al. 2021) with 4·C memory units and double normalisation
    (softmax over positions, then L1 over the units), GroupNorm, residual, GELU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1)
        self.linear_0 = nn.Conv1d(c, 4 * c, 1, bias=False)
        self.linear_1 = nn.Conv1d(4 * c, c, 1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.norm_layer = nn.GroupNorm(4, c)

    def tie_memory(self) -> None:
        """linear_0 = linear_1ᵀ, as the public init leaves them (its last write is linear_1's)."""
        with torch.no_grad():
            self.linear_0.weight.copy_(self.linear_1.weight.permute(1, 0, 2))

    def forward(self, x):
        b, c, h, w = x.shape
        attn = torch.softmax(self.linear_0(self.conv1(x).reshape(b, c, h * w)), dim=-1)
        attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
        y = self.linear_1(attn).reshape(b, c, h, w)
        return F.gelu(self.norm_layer(self.conv2(y)) + x)


class ChannelAttentionBridge(nn.Module):
    """CAB: the five maps' global average pools, concatenated, a shared 1-D conv (k = 3) across
    them, then per map a Linear ('fc') or 1×1 Conv1d to its channels → sigmoid weights."""

    def __init__(self, channels, split_att: str = "fc"):
        super().__init__()
        total = sum(channels)
        self.split_att = split_att
        self.get_all_att = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        for i, c in enumerate(channels, 1):  # att1..att5
            setattr(self, f"att{i}", nn.Linear(total, c) if split_att == "fc" else nn.Conv1d(total, c, 1))

    def forward(self, maps):
        pooled = torch.cat([t.mean(dim=(2, 3)) for t in maps], dim=1)  # (B, ΣC)
        att = self.get_all_att(pooled[:, None])  # (B, 1, ΣC)
        if self.split_att != "fc":
            att = att.transpose(1, 2)  # (B, ΣC, 1) for the 1×1 Conv1d
        out = []
        for i, t in enumerate(maps, 1):
            a = torch.sigmoid(getattr(self, f"att{i}")(att))
            a = a.reshape(t.shape[0], t.shape[1], 1, 1)
            out.append(a)
        return out


class SpatialAttentionBridge(nn.Module):
    """SAB: per map, [channel mean, channel max] → one shared 7×7 conv of dilation 3 → sigmoid."""

    def __init__(self):
        super().__init__()
        self.shared_conv2d = nn.Sequential(nn.Conv2d(2, 1, 7, padding=9, dilation=3), nn.Sigmoid())

    def forward(self, maps):
        return [self.shared_conv2d(torch.cat([t.mean(1, keepdim=True), t.amax(1, keepdim=True)], 1)) for t in maps]


class SC_Att_Bridge(nn.Module):  # noqa: N801 (the public name, in the state dict as `scab`)
    """Spatial attention with a residual, then channel attention, plus the spatially attended maps."""

    def __init__(self, channels, split_att: str = "fc"):
        super().__init__()
        self.catt = ChannelAttentionBridge(channels, split_att)
        self.satt = SpatialAttentionBridge()

    def forward(self, maps):
        spatial = [a * t for a, t in zip(self.satt(maps), maps)]
        mixed = [s + t for s, t in zip(spatial, maps)]
        return [a * m + s for a, m, s in zip(self.catt(mixed), mixed, spatial)]


class MALUNet(nn.Module):
    """``forward(x, need_rep=False, need_proj=False, need_feats=False)`` → dict like
    :class:`UNet` (``pred`` logits at the input size). Defaults: the public config."""

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 3,
        channels=CHANNELS,
        split_att: str = "fc",
        bridge: bool = True,
        rep_dim: int = 0,
        proj_dim: int = 0,
        gray_input: bool = False,
        dropout: bool = False,
    ):
        super().__init__()
        c = list(channels)
        if len(c) != 6 or any(v % 4 for v in c):
            raise ValueError(f"channels: expected six multiples of 4 (GroupNorm(4), DGA's quarters), got {c}")
        if split_att not in ("fc", "conv"):
            raise ValueError(f"split_att: expected 'fc' or 'conv', got {split_att!r}")
        self.input = input_adapter(in_channels, gray_input)
        self.channels, self.strides = [c[1], c[2], c[3], c[5]], [4, 8, 16, 32]  # the ``feats`` maps
        self.bridge = bridge
        self.encoder1 = nn.Sequential(nn.Conv2d(in_channels, c[0], 3, padding=1))
        self.encoder2 = nn.Sequential(nn.Conv2d(c[0], c[1], 3, padding=1))
        self.encoder3 = nn.Sequential(nn.Conv2d(c[1], c[2], 3, padding=1))
        self.encoder4 = nn.Sequential(EAblock(c[2]), DilatedGatedAttention(c[2], c[3]))
        self.encoder5 = nn.Sequential(EAblock(c[3]), DilatedGatedAttention(c[3], c[4]))
        self.encoder6 = nn.Sequential(EAblock(c[4]), DilatedGatedAttention(c[4], c[5]))
        if bridge:
            self.scab = SC_Att_Bridge(c[:5], split_att)
        self.decoder1 = nn.Sequential(DilatedGatedAttention(c[5], c[4]), EAblock(c[4]))
        self.decoder2 = nn.Sequential(DilatedGatedAttention(c[4], c[3]), EAblock(c[3]))
        self.decoder3 = nn.Sequential(DilatedGatedAttention(c[3], c[2]), EAblock(c[2]))
        self.decoder4 = nn.Sequential(nn.Conv2d(c[2], c[1], 3, padding=1))
        self.decoder5 = nn.Sequential(nn.Conv2d(c[1], c[0], 3, padding=1))
        for i in range(5):  # ebn1..5 then dbn1..5: the public state dict's order
            setattr(self, f"ebn{i + 1}", nn.GroupNorm(4, c[i]))
        for i in range(5):
            setattr(self, f"dbn{i + 1}", nn.GroupNorm(4, c[4 - i]))
        self.final = nn.Conv2d(c[0], num_classes, 1)
        self.apply(init_like_upstream)
        for m in self.modules():
            if isinstance(m, EAblock):
                m.tie_memory()
        self.heads = SegmentationHeads(c[0], c[5], rep_dim, proj_dim, HEAD_DROPOUT if dropout else 0.0)

    def forward(self, x, need_rep: bool = False, need_proj: bool = False, need_feats: bool = False) -> dict:
        size = x.shape[-2:]
        out = self.input(x)
        skips = []
        for i in range(1, 6):
            enc, norm = getattr(self, f"encoder{i}"), getattr(self, f"ebn{i}")
            out = F.gelu(F.max_pool2d(norm(enc(out)), 2, 2))
            skips.append(out)
        if self.bridge:
            skips = self.scab(skips)
        bottleneck = F.gelu(self.encoder6(out))
        y = F.gelu(self.dbn1(self.decoder1(bottleneck))) + skips[4]
        for i in range(2, 6):  # decoder2..5: up to the next skip (×2 for sides divisible by 32)
            skip = skips[5 - i]
            y = F.gelu(upsample(getattr(self, f"dbn{i}")(getattr(self, f"decoder{i}")(y)), skip.shape[-2:])) + skip
        feats = [skips[1], skips[2], skips[3], bottleneck]
        return self.heads.outputs(self.final(y), size, y, feats, need_rep, need_proj, need_feats)
