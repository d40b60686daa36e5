"""RA-BUSSeg (ICCV 2025): L = L_s + λ_u·L_u + λ₁·L_ARP + λ₂·L_CRA on U2PL's mean teacher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import busseg_ops
from busseg_ops.ops.adjacent_relation_propagation import MAX_KERNEL_SIZE

from .. import augment
from ..errors import UserError
from ..settings import setting
from .base import (
    IGNORE,
    Method,
    entropy_keep,
    head,
    segmentation_network,
    teacher_train_forward,
    unreliable_filtered_ce,
    unreliable_percent,
)


@dataclass
class RABUSSegSettings:
    """cfg.rabusseg (the L_u settings it shares are cfg.pseudo's)."""

    title: ClassVar[str] = "rabusseg"
    lambda_arp: float = setting(1.0, "weight of L_ARP", non_negative=True)
    lambda_cra: float = setting(1.0, "weight of L_CRA", non_negative=True)
    arp: bool = setting(True, "adjacent relation propagation loss")
    cra: bool = setting(True, "cross-layer relation alignment loss")
    arp_kernel: int = setting(
        3, "ARP neighbourhood side", at_least=1, at_most=(MAX_KERNEL_SIZE, "the largest ARP kernel")
    )
    cra_strategy: str = setting("greedy", "CRA proxy sampling", ("greedy", "random", "kmeans", "patch", "global"))
    cra_scales: int = setting(4, "deepest feature maps aligned by CRA", (2, 3, 4))
    num_proxies: int = setting(
        64,
        "CRA proxies per image (at most the relation grid's pixels)",
        at_least=1,
        at_most=(4096, "CRA builds proxy-by-proxy relation matrices"),
    )

    def validate(self) -> None:
        if self.arp_kernel % 2 == 0:
            raise UserError(f"--arp-kernel {self.arp_kernel}: must be odd")


def relation_grid(model: torch.nn.Module, crop: int) -> tuple[int, int]:
    """(h, w) of the relation projection for a crop: the deepest feature map (ceil at every stride
    for the U-Net and the ResNets; MALUNet pools five times (floor); UNeXt pools three times, then
    two stride-2 convolutions round up)."""
    from ... import models

    if isinstance(model, models.MALUNet):
        side = crop // 32
    elif isinstance(model, models.UNeXt):
        side = -(-(crop // 8) // 4)
    else:
        stride = model.encoder.strides[-1] if isinstance(model, models.UNet) else model.backbone.strides[-1]
        side = -(-crop // stride)
    return side, side


class RABUSSeg(Method):
    """L_u: CE on box-cutmixed unlabelled images against the teacher's mixed pseudo-labels, the
    most uncertain pixels dropped as U2PL's drop_percent schedules (teacher entropy, from its
    train-mode forward on the student's batch with --teacher-train-mode). ARP and CRA switch off
    for the ablations."""

    name = "rabusseg"
    summary = (
        "RA-BUSSeg (ICCV 2025): mean teacher with cutmixed pseudo-labels, adjacent relation "
        "propagation (ARP) and cross-layer relation alignment (CRA) with greedy proxy sampling."
    )
    settings = RABUSSegSettings
    uses_unlabeled = True
    trains_teacher = True

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        return segmentation_network(cfg, proj=cfg.rabusseg.arp or cfg.rabusseg.cra)

    @classmethod
    def check_network(cls, cfg, model) -> None:
        c = cfg.rabusseg
        if not (c.arp or c.cra):
            return
        h, w = relation_grid(model, cfg.crop)
        if c.cra and c.num_proxies > h * w:
            raise UserError(
                f"--num-proxies {c.num_proxies}: the {h}×{w} relation grid of a {cfg.crop}-px crop has only "
                f"{h * w} positions; use --num-proxies {h * w} or less, or a larger --crop"
            )
        reach = 2 * max(h, w) - 1
        if c.arp and c.arp_kernel > reach:
            raise UserError(
                f"--arp-kernel {c.arp_kernel}: the {h}×{w} relation grid of a {cfg.crop}-px crop is covered by a "
                f"kernel of {reach}; use --arp-kernel {reach} or less, or a larger --crop"
            )

    def __init__(self, cfg):
        from ... import models

        super().__init__(cfg)
        c = cfg.rabusseg
        if c.cra and not hasattr(busseg_ops, "greedy_proxy_sampling"):
            raise RuntimeError(
                "rabusseg with CRA needs busseg_ops.greedy_proxy_sampling and the other "
                "CRA ops (issue 3), which this build lacks; pass --no-cra for ARP only"
            )
        self.arp = models.AdjacentRelationPropagation(kernel_size=c.arp_kernel)
        self.cra = models.CrossLayerRelationAlignment(c.num_proxies, c.cra_scales, c.cra_strategy)

    def frozen(self, network, ctx):
        idle = ctx["warmup"] or not ctx["semi"]  # L_s alone: U2PL's sup_only epochs, or no unlabelled image
        return head(network, "proj") if idle else []

    def __call__(self, student, teacher, lab, unl, ctx):
        c, p = self.cfg.rabusseg, self.cfg.pseudo
        if unl is None or ctx.get("warmup", False):  # U2PL's sup_only epochs: L_s alone, ARP/CRA too wait
            return super().__call__(student, teacher, lab, unl, ctx)
        xl, yl = lab["image"], lab["mask"]
        size = xl.shape[-2:]
        logs = {}
        xu, valid = unl["image"], unl["mask"] != IGNORE
        with torch.no_grad():
            prob = torch.softmax(teacher(xu)["pred"], 1)
            pl = prob.argmax(1).masked_fill(~valid, IGNORE)
        box = augment.cutmix_box(len(xu), *size, p=p.cutmix_p)
        xu, pl_u, prob_u = augment.mix(box, xu, pl, prob)
        x, targets, nl = torch.cat([xl, xu]), torch.cat([yl, pl_u]), len(xl)
        out = student(x, need_proj=c.arp or c.cra, need_feats=c.cra)
        pred = out["pred"]
        if p.teacher_train_mode:  # U2PL: the uncertainty of the train-mode teacher on the student's batch
            prob_u = torch.softmax(teacher_train_forward(teacher, x)["pred"][nl:], 1)
        loss_s = self.sup(pred[:nl], yl)
        loss = loss_s
        logs["loss_s"] = loss_s.detach()
        drop = unreliable_percent(p.drop_percent, ctx["epoch"], ctx["epochs"])
        loss_u = unreliable_filtered_ce(pred[nl:], pl_u, prob_u, drop)
        loss = loss + p.lambda_u * loss_u
        logs["loss_u"] = loss_u.detach()
        if c.arp:  # L_ARP = CE(upsample(ARP(proj, logits↓ detached)), GT / pseudo-label)
            loss_arp = self.arp.loss(out["proj"], pred, targets)
            loss = loss + c.lambda_arp * loss_arp
            logs["loss_arp"] = loss_arp.detach()
        if c.cra:  # first proxy on the (pseudo-)lesion; L_CRA over the deepest cra_scales maps
            loss_cra = self.cra(out["feats"], out["proj"], label=targets)
            loss = loss + c.lambda_cra * loss_cra
            logs["loss_cra"] = loss_cra.detach()
        return loss, logs

    def pseudo_label_keep(self, prob, cls, ctx):
        # The step drops the scheduled share of most uncertain pixels batch-wide; here per image.
        return entropy_keep(prob, unreliable_percent(self.cfg.pseudo.drop_percent, ctx["epoch"], ctx["epochs"]))
