"""LA-Net (MedIA 2023): lesion-aware attention, trained in two stages (localisation, then joint
classification with pseudo location labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..settings import setting
from .base import IGNORE, Method, class_loss, resnet_options


def bce(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary CE of a (B, 1, H, W) mask head against 0/1 targets, ignoring 255."""
    valid = target != IGNORE
    if not valid.any():
        return mask_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(mask_logits[:, 0][valid], target[valid].float())


@dataclass
class LANetSettings:
    """cfg.lanet (the first stage's length is --stage1-epochs)."""

    title: ClassVar[str] = "lanet"
    tau: float = setting(0.8, "class confidence needed for pseudo location labels", within="[0, 1]")
    alpha: float = setting(0.1, "weight of the pseudo-labelled localisation loss", within="[0, 1]")
    lam: float = setting(0.5, "classification share of the stage-2 loss", within="[0, 1]")


class LANet(Method):
    """Two-stage sequential training (Eq. 6–7) of the LANet model (sigmoid lesion mask +
    classifier): stage 1 segmentation on location labels; stage 2 L = λ·L_cls + (1−λ)·(L_sloc-w +
    α·L_sloc-wo) with pseudo location labels binarize(P_pixel > 0.5) kept only for images whose
    class confidence exceeds τ. The unlabelled images are its class-only images: they need class
    labels (`cls` ≥ 0; BUSI and the synthetic set have them)."""

    name = "lanet"
    summary = (
        "LA-Net (MedIA 2023): lesion-aware attention network, two-stage training of "
        "localisation then joint classification with pseudo location labels (needs class labels)."
    )
    settings = LANetSettings
    uses_unlabeled = True

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.model in ("malunet", "unext"):
            raise UserError(
                f"--model {cfg.model}: lanet builds its attention network on --backbone (resnetNN or unet), "
                "not on a whole segmentation network"
            )
        if cfg.pretrained is not None and cfg.backbone == "unet":
            raise UserError(
                "--pretrained: this network has no ResNet backbone (--model deeplab, or lanet with --backbone resnetNN)"
            )

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        from ... import models

        kw = resnet_options(cfg) if cfg.backbone != "unet" else {}
        return models.LANet(
            2, backbone=cfg.backbone, unet_base=cfg.unet_base, in_channels=cfg.in_channels, gray_input=True, **kw
        )

    def frozen(self, network, ctx):
        return [network.fc] if ctx["epoch"] < self.cfg.stage1_epochs else []  # stage 1: no classification

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg.lanet
        xl, yl = lab["image"], lab["mask"]
        if ctx["epoch"] < self.cfg.stage1_epochs:  # stage 1: L_floc on location labels
            loss = bce(student(xl)["mask_logits"], yl)
            return loss, {"loss_floc": loss.detach()}
        nl = len(xl)
        out = student(xl if unl is None else torch.cat([xl, unl["image"]]))
        logits = out["mask_logits"]
        loss_cls = class_loss(out["cls"], lab, unl)
        loss_w = bce(logits[:nl], yl)
        if unl is None:  # every image has a location label (e.g. --partition 1/1): no L_sloc-wo
            loss = c.lam * loss_cls + (1 - c.lam) * loss_w
            return loss, {"loss_cls": loss_cls.detach(), "loss_sloc_w": loss_w.detach()}
        with torch.no_grad():  # pseudo location labels binarize(P_pixel > 0.5), only where P_cls > τ
            pseudo = (logits[nl:, 0] > 0).long()
            confident = torch.softmax(out["cls"][nl:], 1).max(1).values > c.tau
            pseudo[~confident] = IGNORE
            pseudo[unl["mask"] == IGNORE] = IGNORE
        loss_wo = bce(logits[nl:], pseudo)
        loss = c.lam * loss_cls + (1 - c.lam) * (loss_w + c.alpha * loss_wo)
        return loss, {"loss_cls": loss_cls.detach(), "loss_sloc_w": loss_w.detach(), "loss_sloc_wo": loss_wo.detach()}

    def pseudo_label_keep(self, prob, cls, ctx):
        if cls is None:
            return None
        confident = cls.amax(1) > self.cfg.lanet.tau  # whole images, by their class confidence
        return confident[:, None, None].expand(prob.shape[0], *prob.shape[2:])
