"""Training steps of the methods, all on the mean-teacher framework (the engine keeps the EMA
teacher and evaluates it). A method maps one labelled and one unlabelled batch to a loss.

  suponly    L = L_s on the labelled batch.
  rabusseg   L = L_s + λ_u·L_u + λ₁·L_ARP + λ₂·L_CRA (RA-BUSSeg; λ's = 1, seed supp. Table 1).
             L_u: CE on box-cutmixed unlabelled images against the teacher's mixed pseudo-labels,
             dropping the most uncertain `drop_percent` of pixels by entropy. ARP and CRA switch off
             for the ablations; the CRA proxy strategy and number of scales are options.
  phnet      PH-Net: adaptive patch cutmix with dynamic shielding (APA), confidence-filtered L_u,
             hard-patch contrastive loss (HPC) with the class memory bank (MB); all switchable.
  lanet      LA-Net's two-stage sequential training: stage 1 segmentation on location labels;
             stage 2 L = λ·L_cls + (1−λ)·(L_sloc-w + α·L_sloc-wo) with pseudo location labels
             binarize(P_pixel > 0.5) kept only for images whose class confidence exceeds τ.
During the first `warmup_epochs` every method trains on the labelled batch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import busseg_ops

from . import augment

IGNORE = augment.IGNORE


def up(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=True (the upstream convention for logits and maps)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def down_labels(target: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with ignore 255; 0 (still attached to the graph) when every pixel is ignored."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def entropy_filtered_ce(logits: torch.Tensor, target: torch.Tensor, prob: torch.Tensor,
                        drop_percent: float) -> torch.Tensor:
    """CE over the pixels whose teacher entropy is below the (100 − drop_percent)-th percentile of
    the valid pixels (RA-BUSSeg / U2PL: the most uncertain pixels are not trusted)."""
    target = target.clone()
    valid = target != IGNORE
    if drop_percent > 0 and valid.any():
        ent = -(prob * torch.log(prob + 1e-10)).sum(1)
        thresh = torch.quantile(ent[valid].float(), 1 - drop_percent / 100.0)
        target[valid & (ent > thresh)] = IGNORE
    return ce(logits, target)


class Method:
    """Base: the supervised-only step. Subclasses add the unlabelled terms."""

    name = "suponly"
    uses_unlabeled = False

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, student, teacher, lab: dict, unl: dict | None, ctx: dict):
        x, y = lab["image"], lab["mask"]
        out = student(x)
        loss_s = ce(up(out["pred"], x.shape[-2:]), y)
        return loss_s, {"loss_s": loss_s.detach()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SupOnly(Method):
    pass


# ----------------------------------------------------------------------------------------------

class RABUSSeg(Method):
    name = "rabusseg"
    uses_unlabeled = True

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg
        xl, yl = lab["image"], lab["mask"]
        size = xl.shape[-2:]
        logs = {}
        if unl is None or ctx.get("warmup", False):
            x, targets, nl = xl, yl, len(xl)
            prob_u = pl_u = None
        else:
            xu, valid = unl["image"], unl["mask"] != IGNORE
            with torch.no_grad():
                prob = torch.softmax(up(teacher(xu)["pred"], size), 1)
                pl = prob.argmax(1).masked_fill(~valid, IGNORE)
            box = augment.cutmix_box(len(xu), *size, p=c.cutmix_p)
            xu, pl_u, prob_u = augment.mix(box, xu, pl, prob)
            x, targets, nl = torch.cat([xl, xu]), torch.cat([yl, pl_u]), len(xl)
        out = student(x)
        pred = up(out["pred"], size)
        loss_s = ce(pred[:nl], yl)
        loss = loss_s
        logs["loss_s"] = loss_s.detach()
        if prob_u is not None:
            loss_u = entropy_filtered_ce(pred[nl:], pl_u, prob_u, c.drop_percent)
            loss = loss + c.lambda_u * loss_u
            logs["loss_u"] = loss_u.detach()
        if c.arp:
            loss_arp = self.arp_loss(out, targets, size)
            loss = loss + c.lambda_arp * loss_arp
            logs["loss_arp"] = loss_arp.detach()
        if c.cra:
            loss_cra = self.cra_loss(out, targets)
            loss = loss + c.lambda_cra * loss_cra
            logs["loss_cra"] = loss_cra.detach()
        return loss, logs

    def arp_loss(self, out: dict, targets: torch.Tensor, size) -> torch.Tensor:
        """L_ARP = CE(upsample(ARP(proj(deepest), logits↓ detached)), target) (SPEC §1)."""
        feat = out["arp"]
        value = up(out["pred"].detach(), feat.shape[-2:])
        prop = busseg_ops.adjacent_relation_propagation(feat, value, kernel_size=self.cfg.arp_kernel)
        return ce(up(prop, size), targets)

    def cra_loss(self, out: dict, targets: torch.Tensor) -> torch.Tensor:
        """L_CRA over the `cra_scales` deepest encoder maps (SPEC §2): proxies chosen on the deepest
        map, mapped to each layer's own grid and gathered there (they keep their gradient); the maps
        resized to the deep grid and detached."""
        c = self.cfg
        feats = out["feats"][-c.cra_scales:]
        deep = feats[-1]
        hw = tuple(deep.shape[-2:])
        if c.cra_strategy == "global":  # Table 4 row 2: every pixel a proxy
            proxies = [up(f, hw).flatten(2).transpose(1, 2) for f in feats]
        else:
            label = (down_labels(targets, hw) == 1).long()
            idx = self.proxies(deep.detach(), label)
            proxies = []
            for f in feats:
                fi = busseg_ops.map_proxy_indices(idx, hw, tuple(f.shape[-2:]))
                proxies.append(busseg_ops.gather_proxies(f, fi))
        resized = [up(f, hw).detach() for f in feats]
        return busseg_ops.cross_layer_alignment_loss(resized, proxies)

    def proxies(self, deep: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        m = min(c.num_proxies, deep.shape[-2] * deep.shape[-1])
        if c.cra_strategy == "greedy":
            return busseg_ops.greedy_proxy_sampling(deep, m, label=label)
        if c.cra_strategy == "random":
            n = deep.shape[-2] * deep.shape[-1]
            return torch.stack([torch.randperm(n)[:m] for _ in range(len(deep))]).to(deep.device)
        fn = getattr(busseg_ops, f"{c.cra_strategy}_proxy_sampling", None)
        if fn is None:
            raise ValueError(f"cra_strategy {c.cra_strategy!r}: busseg_ops has no "
                             f"{c.cra_strategy}_proxy_sampling; use greedy, random or global")
        return fn(deep, m)


# ----------------------------------------------------------------------------------------------

class LANet(Method):
    """Two-stage sequential training (LA-Net, MedIA 2023, Eq. 6–7). Needs image class labels
    (`cls` ≥ 0) on the unlabelled images: they are the class-only images."""

    name = "lanet"
    uses_unlabeled = True

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg
        xl, yl = lab["image"], lab["mask"]
        size = xl.shape[-2:]
        if unl is None or ctx["epoch"] < c.stage1_epochs:  # stage 1: L_floc on location labels
            out = student(xl)
            loss = ce(up(out["pred"], size), yl)
            return loss, {"loss_floc": loss.detach()}
        xu = unl["image"]
        out = student(torch.cat([xl, xu]))
        nl = len(xl)
        pred = up(out["pred"], size)
        cls_t = torch.cat([lab["cls"], unl["cls"]]).to(pred.device)
        known = cls_t >= 0
        loss_cls = F.cross_entropy(out["cls"][known], cls_t[known]) if known.any() else pred.sum() * 0
        loss_w = ce(pred[:nl], yl)
        with torch.no_grad():  # pseudo location labels, gated by class confidence > τ
            p_pix = torch.softmax(pred[nl:], 1)[:, 1]
            p_cls = torch.softmax(out["cls"][nl:], 1).max(1).values
            pseudo = (p_pix > 0.5).long()
            pseudo[~(p_cls > c.tau)] = IGNORE
            pseudo[unl["mask"] == IGNORE] = IGNORE
        loss_wo = ce(pred[nl:], pseudo)
        loss = c.lam * loss_cls + (1 - c.lam) * (loss_w + c.alpha * loss_wo)
        return loss, {"loss_cls": loss_cls.detach(), "loss_sloc_w": loss_w.detach(), "loss_sloc_wo": loss_wo.detach()}


METHODS = {m.name: m for m in (SupOnly, RABUSSeg, LANet)}


def build(cfg) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {cfg.method!r}")
    return METHODS[cfg.method](cfg)
