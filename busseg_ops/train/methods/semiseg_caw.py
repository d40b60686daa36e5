"""SemiSeg-CAW (2025): a pre-trained ClassElevateSeg guide map and learned per-loss weights (WGM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import busseg_ops

from ..errors import UserError
from ..settings import setting
from .base import IGNORE, Method, class_loss, resnet_options


@dataclass
class SemiSegCAWSettings:
    """cfg.semiseg_caw (the pre-training's length is --stage1-epochs, the pseudo-labels' threshold
    cfg.pseudo's --gamma)."""

    title: ClassVar[str] = "semiseg_caw"
    wgm: bool = setting(True, "learned loss weights (off: all 1)")
    weighting: str = setting(
        "wgm",
        "the learned loss weights (with --wgm): wgm, the paper's WGM; imtl, IMTL (Liu et al., ICLR 2021: "
        "learned loss scales + closed-form gradient weights on the shared encoder), the paper's ablation "
        "'strategy of [21] instead of WGM'",
        choices=("wgm", "imtl"),
    )
    class_elevate: bool = setting(
        True, "the ClassElevateSeg guide map and its pre-training (off: the main network alone)"
    )
    guide_map: str = setting(
        "segmentation",
        "the guide map read off the pre-trained ClassElevateSeg: segmentation, its foreground probability "
        "(the paper's); layercam, the LayerCAM of its classifier at a map before its deepest (MALUNet, UNeXt: "
        "stride 16; the paper's ablation 'LayerCAM instead of ClassElevateSeg')",
        choices=("segmentation", "layercam"),
    )


class SemiSegCAW(Method):
    """On models.SemiSegCAW. Stage 1 (`stage1_epochs`): pre-train the ClassElevateSeg auxiliary
    network (segmentation on the labelled images + classification on every image with a class
    label, the class-only images included). Stage 2: it is frozen and guides the main network,
    trained on L_seg (labelled), L_cls (all class labels) and L_u (teacher pseudo-labels,
    confidence ≥ γ; absent without unlabelled images) combined by the weight generation module
    (WGM; `weighting` imtl: IMTL instead; `wgm` off: static weights 1). Without ClassElevateSeg
    (`class_elevate` off) there is no stage 1: the main network trains from the first step;
    `guide_map` layercam reads the guide off its classifier (LayerCAM) instead of its segmentation."""

    name = "semiseg_caw"
    summary = (
        "SemiSeg-CAW (2025): a pre-trained ClassElevateSeg guide map and learned "
        "per-loss weights (WGM) for segmentation, classification and pseudo-label losses."
    )
    settings = SemiSegCAWSettings
    uses_unlabeled = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        c = cfg.semiseg_caw
        if c.weighting != "wgm" and not c.wgm:
            raise UserError(
                f"--weighting {c.weighting}: the learned loss weights are off (--no-wgm); drop one of the two"
            )
        if c.guide_map != "segmentation" and not c.class_elevate:
            raise UserError(
                f"--guide-map {c.guide_map}: there is no ClassElevateSeg to read it off (--no-class-elevate); "
                "drop one of the two"
            )

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        from ... import models

        if cfg.model == "deeplab":
            kw = dict(backbone=cfg.backbone, **resnet_options(cfg))
        else:
            kw = dict(base=cfg.unet_base) if cfg.model == "unet" else {}  # MALUNet, UNeXt: their public configs
        # no public code to follow: its networks stay as the paper describes them, without dropout
        c = cfg.semiseg_caw
        guide = dict(guide=c.class_elevate, guide_map=c.guide_map)
        caw = dict(freeze_aux=False, rep_dim=0, proj_dim=0, dropout=False, **guide)
        return models.SemiSegCAW(2, 2, arch=cfg.model, in_channels=cfg.in_channels, gray_input=True, **caw, **kw)

    def __init__(self, cfg):
        from ... import models

        super().__init__(cfg)
        self.wgm = models.WeightGenerationModule(3)
        self.imtl = models.IMTL(3) if cfg.semiseg_caw.weighting == "imtl" else None

    def stage1(self, network, ctx) -> bool:
        return network.aux is not None and ctx["epoch"] < self.cfg.stage1_epochs

    def frozen(self, network, ctx):
        if network.aux is None:
            return []
        return [network.main] if self.stage1(network, ctx) else [network.aux]

    def parameters(self):
        return list(self.wgm.parameters()) + (list(self.imtl.parameters()) if self.imtl is not None else [])

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg.semiseg_caw
        net = student.module if hasattr(student, "module") else student
        stage1 = self.stage1(net, ctx)
        if net.aux is not None:  # off: the paper's "removing ClassElevateSeg" (--no-class-elevate)
            net.freeze_aux = not stage1  # set every step: the stage follows the epoch (and resumes)
            net.aux.train(stage1 and net.training)  # frozen in stage 2: no BN statistics updates
        xl, yl = lab["image"], lab["mask"]
        x = xl if unl is None else torch.cat([xl, unl["image"]])
        nl = len(xl)
        if stage1:
            out = student(x, aux_only=True, need_guide=False)  # through DDP's forward, which syncs the gradients
            loss_seg = self.sup(out["pred"][:nl], yl)
            loss_cls = class_loss(out["cls"], lab, unl)
            return loss_seg + loss_cls, {"loss_aux_seg": loss_seg.detach(), "loss_aux_cls": loss_cls.detach()}
        out = student(x)
        loss_seg = self.sup(out["pred"][:nl], yl)
        loss_cls = class_loss(out["cls"], lab, unl)
        loss_u = None  # no unlabelled image (every mask known): no pseudo-label term
        if unl is not None:
            with torch.no_grad():
                prob = torch.softmax(teacher(unl["image"])["pred"], 1)
                pl = prob.argmax(1).masked_fill(unl["mask"] == IGNORE, IGNORE)
            loss_u = busseg_ops.confidence_masked_cross_entropy(out["pred"][nl:], pl, prob, self.cfg.pseudo.gamma)
        losses = [loss_seg, loss_cls, loss_u]
        alpha = None
        if not c.wgm:
            loss, w = sum(v for v in losses if v is not None), torch.ones(3)
        elif self.imtl is not None:  # IMTL's shared parameters: those of the main network every task reaches
            loss, w, alpha = self.imtl(losses, list(net.main.parameters()))
        else:
            loss, w = self.wgm(losses)
        logs = {"loss_seg": loss_seg.detach(), "loss_cls": loss_cls.detach(), "w_seg": w[0], "w_cls": w[1]}
        if loss_u is not None:
            logs.update(loss_u=loss_u.detach(), w_u=w[2])
        if alpha is not None:  # IMTL-G's weights on the shared gradient
            logs.update({f"alpha_{k}": alpha[t] for t, k in enumerate(("seg", "cls", "u")) if losses[t] is not None})
        return loss, logs

    def pseudo_label_keep(self, prob, cls, ctx):
        return prob.amax(1) >= self.cfg.pseudo.gamma  # as confidence_masked_cross_entropy

    def state_dict(self) -> dict:
        return {"wgm": self.wgm.state_dict(), **({"imtl": self.imtl.state_dict()} if self.imtl is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.wgm.load_state_dict(state["wgm"])
        if self.imtl is not None:
            self.imtl.load_state_dict(state["imtl"])
