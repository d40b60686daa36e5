"""ARP on a synthetic lesion: propagate noisy logits with feature affinities and save a picture
of the result. Run with `make demo`."""

import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

import busseg_ops


def main(out_dir: str = "runs/arp_demo") -> None:
    torch.manual_seed(0)
    H = W = 65
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    lesion = (((yy - 30) / 14.0) ** 2 + ((xx - 34) / 20.0) ** 2 < 1).float()
    # Features: a lesion/background embedding plus noise; logits: the truth plus heavy noise.
    feat = torch.stack([lesion * 2 - 1, 1 - lesion * 2] + [torch.zeros_like(lesion)] * 6)[None]
    feat = feat + 0.3 * torch.randn_like(feat)
    logits = torch.stack([1 - lesion, lesion])[None] * 2 - 1 + 1.2 * torch.randn(1, 2, H, W)
    refined = busseg_ops.adjacent_relation_propagation(feat, logits, kernel_size=7, scale=2.0)
    for _ in range(3):
        refined = busseg_ops.adjacent_relation_propagation(feat, refined, kernel_size=7, scale=2.0)
    truth = lesion.bool()
    for name, x in (("noisy logits", logits), ("after ARP", refined)):
        pred = x.argmax(1)[0].bool()
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        print(f"{name:>13}: Dice {dice:.3f}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "arp_demo.png")
    strip = torch.cat([lesion, logits.argmax(1)[0].float(), refined.argmax(1)[0].float()], 1)
    strip = F.interpolate(strip[None, None], scale_factor=4, mode="nearest")[0, 0]
    Image.fromarray((strip * 255).byte().numpy()).save(path)
    print(f"picture (truth | noisy argmax | after ARP): {path}")
    print(f"backends available here: {busseg_ops.available_backends()}")


if __name__ == "__main__":
    main(*sys.argv[1:])
