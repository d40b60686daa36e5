"""PH-Net (CVPR 2024): adaptive patch cutmix (APA), the authors' L_u, hard-patch contrast (HPC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import busseg_ops

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
class PHNetSettings:
    """cfg.phnet (the L_u settings it shares are cfg.pseudo's)."""

    title: ClassVar[str] = "phnet"
    apa: bool = setting(True, "adaptive patch cutmix (off: plain box cutmix)")
    shield: bool = setting(True, "shield the hardest patches within APA (apa_mix easy_rand, ramp)")
    apa_mix: str = setting(
        "easy_easy",
        "APA's mixing: easy_easy (PH-Net's released generate_patch_data default: each image's easiest 40 %% + 1 "
        "patches replaced by the next image's easiest), easy_rand (10-50 %% random patches from the next image, the "
        "hardest beta share shielded, constant) or ramp (the paper's Eq. 5: shield beta·t/T, ramping)",
        ("easy_easy", "easy_rand", "ramp"),
    )
    unsup_form: str = setting(
        "code",
        "phnet's L_u: code (the authors' deleted loss_helper.py, U2PL's: drop the scheduled drop_percent share of "
        "most uncertain pixels, CE mean × all/kept pixels) or paper (CE where the teacher's confidence ≥ gamma, "
        "averaged over all pixels)",
        ("code", "paper"),
    )
    hpc: bool = setting(True, "hard-patch contrastive loss")
    mb: bool = setting(True, "memory-bank positives (off: the batch's class means)")
    num_patches: int = setting(
        4, "N×N patch grid (paper: 25-px patches, N = 20 at 500 px)", at_least=1, at_most=(512, "the patch grid's side")
    )
    beta: float = setting(0.3, "largest share of shielded patches", within="[0, 1]")
    lambda_c: float = setting(1.0, "weight of the contrastive loss", non_negative=True)
    temperature: float = setting(0.5, "contrastive temperature", positive=True)
    bank_size: int = setting(
        4096, "memory-bank entries per class", at_least=1, at_most=(65536, "entries per class kept in memory")
    )
    max_anchors: int = setting(
        1024, "contrastive anchors per step", at_least=1, at_most=(65536, "contrastive anchors per step")
    )
    contrast_negatives: str = setting(
        "centres",
        "negatives of an anchor: centres (the other classes' centres, PH-Net's released patch_contrast) "
        "or anchors (every other-class anchor of the step, the paper's Eq. 15)",
        ("centres", "anchors"),
    )
    hpc_form: str = setting(
        "code",
        "the HPC term: paper (Eq. 13-15: anchors in the hardest patches, memory-bank centres) or code (PH-Net's "
        "released patch_contrast: anchors in patches holding both classes, whose feature agrees with their "
        "pseudo-label, against ground-truth class means of the teacher's features in the labelled patch of "
        "nearest hardness; --mb and --contrast-negatives do not apply)",
        ("paper", "code"),
    )


class PHNet(Method):
    """APA by the teacher's patch-entropy hardness (:meth:`patch_mix`; off: plain box cutmix). L_u:
    the authors' (U2PL's) entropy-filtered CE (unsup_form code) or CE counted where the teacher's
    confidence on the mixed image is ≥ γ (paper). HPC: the released patch_contrast (hpc_form code)
    or InfoNCE of reliable hard-patch projector features against their class centre (paper; MB:
    from the memory bank; off: the batch's own class means). The teacher's probabilities and
    features of the mixed batch come from its train-mode forward with teacher_train_mode, as
    U2PL's."""

    name = "phnet"
    summary = (
        "PH-Net (CVPR 2024): adaptive patch cutmix that shields the hardest patches, and a "
        "hard-patch contrastive loss against a class memory bank."
    )
    settings = PHNetSettings
    uses_unlabeled = True
    trains_teacher = True

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        return segmentation_network(cfg, rep=cfg.phnet.hpc)

    @classmethod
    def check_network(cls, cfg, model) -> None:
        if cfg.crop % cfg.phnet.num_patches:
            raise UserError(
                f"--num-patches {cfg.phnet.num_patches}: the patches must tile the {cfg.crop}-px crop exactly"
            )

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bank = busseg_ops.ClassMemoryBank(2, cfg.rep_dim, cfg.phnet.bank_size)

    def frozen(self, network, ctx):
        idle = ctx["warmup"] or not ctx["semi"]  # L_s alone: the sup_only epochs, or no unlabelled image
        return head(network, "rep") if idle else []

    def __call__(self, student, teacher, lab, unl, ctx):
        c, u = self.cfg.phnet, self.cfg.pseudo
        xl, yl = lab["image"], lab["mask"]
        if unl is None or ctx.get("warmup", False):
            return super().__call__(student, teacher, lab, unl, ctx)
        xu, valid = unl["image"], unl["mask"] != IGNORE
        with torch.no_grad():
            prob = torch.softmax(teacher(xu)["pred"], 1)
            pl = prob.argmax(1).masked_fill(~valid, IGNORE)
            hardness = busseg_ops.patch_entropy_hardness(prob, num_patches=c.num_patches)
        if c.apa:
            xm, plm = self.patch_mix([xu, pl], hardness, ctx)
        else:
            xm, plm = augment.mix(augment.cutmix_box(len(xu), *xu.shape[-2:], p=u.cutmix_p), xu, pl)
        nl = len(xl)
        x = torch.cat([xl, xm])
        code_hpc = c.hpc and c.hpc_form == "code"
        if u.teacher_train_mode:  # U2PL's second teacher forward, which patch_contrast's inputs come from
            t = teacher_train_forward(teacher, x, need_rep=code_hpc)
        else:
            with torch.no_grad():
                t = teacher(x, need_rep=code_hpc)
        tprob_all = torch.softmax(t["pred"], 1)
        tprob = tprob_all[nl:]
        out = student(x, need_rep=c.hpc)
        pred = out["pred"]
        loss_s = self.sup(pred[:nl], yl)
        if c.unsup_form == "code":  # the authors' loss_helper.py: U2PL's entropy filter and weight
            loss_u = unreliable_filtered_ce(
                pred[nl:], plm, tprob, unreliable_percent(u.drop_percent, ctx["epoch"], ctx["epochs"])
            )
        else:
            loss_u = busseg_ops.confidence_masked_cross_entropy(pred[nl:], plm, tprob, u.gamma)
        loss = loss_s + u.lambda_u * loss_u
        logs = {"loss_s": loss_s.detach(), "loss_u": loss_u.detach()}
        if code_hpc:  # prototypes: the teacher's labelled features under the ground truth
            loss_c, stats = patch_prototype_contrast(
                out["rep"][nl:], plm, tprob, t["rep"][:nl], yl, tprob_all[:nl], c.num_patches, c.temperature
            )
            loss = loss + c.lambda_c * loss_c
            logs["loss_c"] = loss_c.detach()
            logs.update(stats)
        elif c.hpc:
            loss_c, stats = self.contrastive(out["rep"][nl:], plm, tprob)
            loss = loss + c.lambda_c * loss_c
            logs["loss_c"] = loss_c.detach()
            logs.update(stats)
        return loss, logs

    def patch_mix(self, tensors, hardness, ctx):
        """APA by `apa_mix`: the released code's easy_easy swap, or random patches with the hardest
        shielded, a constant share (easy_rand: the released code's N² − round(N²·(1 − β))) or the
        paper's ramp k = ⌊β·t/T·N²⌋."""
        c = self.cfg.phnet
        if c.apa_mix == "easy_easy":
            return augment.easy_patch_swap(tensors, hardness)
        n2 = c.num_patches**2
        if not c.shield:
            k = 0
        elif c.apa_mix == "easy_rand":
            k = n2 - round(n2 * (1 - c.beta))
        else:
            k = busseg_ops.shield_count(c.beta, min(1.0, ctx["progress"]), n2)
        mixed, _ = busseg_ops.adaptive_patch_cutmix(tensors, hardness, k)
        return mixed

    def pseudo_label_keep(self, prob, cls, ctx):
        if self.cfg.phnet.unsup_form == "code":
            return entropy_keep(prob, unreliable_percent(self.cfg.pseudo.drop_percent, ctx["epoch"], ctx["epochs"]))
        return prob.amax(1) >= self.cfg.pseudo.gamma  # as confidence_masked_cross_entropy

    def contrastive(self, rep, plm, tprob):
        c = self.cfg.phnet
        hard_m = busseg_ops.patch_entropy_hardness(tprob, num_patches=c.num_patches)
        k = max(1, busseg_ops.shield_count(c.beta, 1.0, c.num_patches**2))  # anchors: the hardest patches
        sel = busseg_ops.reliable_hard_pixels(plm, tprob.argmax(1), hard_m, k, rep.shape[-2:])
        keep = sel.mask & (sel.labels != IGNORE)
        anchors = rep.permute(0, 2, 3, 1)[keep]
        labels = sel.labels[keep]
        if len(anchors) > c.max_anchors:  # a random subset (U2PL/PH-Net sample anchors too)
            pick = torch.randperm(len(anchors), device=anchors.device)[: c.max_anchors]
            anchors, labels = anchors[pick], labels[pick]
        if c.mb:
            positives = bank_centres(self.bank, anchors.device)
            self.bank.push(anchors.detach(), labels)  # after use: this batch is not its own positive
        else:
            positives = [anchors[labels == j].detach().mean(0) if (labels == j).any() else None for j in range(2)]
        if c.contrast_negatives == "anchors":  # Eq. 15 as printed: every other-class anchor
            negatives, negative_labels = anchors.detach(), labels
        elif any(p is None for p in positives):  # a centre is missing: no 2-way softmax yet
            return rep.sum() * 0.0, {"c_anchors": torch.tensor(float(len(anchors)))}
        else:  # the released patch_contrast: one negative, the other class's centre (a 2-way softmax)
            negatives, negative_labels = torch.stack(positives), torch.arange(len(positives), device=rep.device)
        loss = busseg_ops.memory_contrastive_loss(anchors, labels, negatives, negative_labels, positives, c.temperature)
        return loss, contrastive_stats(anchors.detach(), labels, positives, negatives, negative_labels, self.bank)

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "bank" in state:
            self.bank.load_state_dict(state["bank"])


def bank_centres(bank, device) -> list:
    """The memory bank's class means (None for an empty class) on `device`: the bank lives on the
    CPU, the anchors on the training device (--device cuda)."""
    return [None if p is None else p.to(device) for p in bank.means()]


def _patches(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) → (B·n·n, C, H/n · W/n): the n×n grid's patches, row-major per image."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * n * n, c, (h // n) * (w // n))


def patch_prototype_contrast(rep_u, label_u, prob_u, rep_l, label_l, prob_l, num_patches, temperature):
    """PH-Net's HPC as its released ``patch_contrast`` computes it (not Eq. 13-15).

    Patches of the n×n grid that hold both classes take part: on the labelled images by their
    ground truth, on the unlabelled by their pseudo-labels (255 ignored). Each labelled one gives
    two prototypes, the class means of the teacher's features ``rep_l`` under its ground truth;
    each unlabelled one is paired with the labelled one of nearest hardness (PH-Net Eq. 4 of the
    teacher's probabilities; the first on ties). Anchors: the student's features ``rep_u`` whose
    pseudo-label is the class of the prototype they are closer to (dot product), a filter against
    wrong pseudo-labels. Loss: a 2-way softmax over the cosines to the own and the other class's
    prototype at ``temperature``, averaged over each (patch, class) group's anchors, then over the
    groups. Inputs (B, D, h, w) / (B, h, w) / (B, 2, h, w): the labels and probabilities are brought
    to the features' size and sides not divisible by n resized up (bilinear; labels nearest), as
    upstream resizes to its feature size.
    Returns (loss, per-step statistics as :func:`contrastive_stats`'s)."""
    n = num_patches
    h, w = rep_u.shape[-2:]
    size = (n * -(-h // n), n * -(-w // n))

    def resize(x):  # to the feature grid: a network whose projector runs below the input size
        if tuple(x.shape[-2:]) == size:  # (DeepLab at stride 4, MALUNet at 2) gets its maps brought to it
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def resize_labels(y):
        if tuple(y.shape[-2:]) == size:
            return y
        return F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long()

    rep_u, rep_l, prob_u, prob_l = map(resize, (rep_u, rep_l, prob_u, prob_l))
    label_u, label_l = resize_labels(label_u), resize_labels(label_l)
    zero = rep_u.sum() * 0.0
    lu, ll = _patches(label_u[:, None], n)[:, 0], _patches(label_l[:, None], n)[:, 0]  # (P, pixels)
    mixed_u = ((lu == 0).any(1) & (lu == 1).any(1)).nonzero()[:, 0]
    mixed_l = ((ll == 0).any(1) & (ll == 1).any(1)).nonzero()[:, 0]
    stats = {"c_anchors": torch.tensor(0.0), "c_patches": torch.tensor(float(len(mixed_u)))}
    if len(mixed_u) == 0 or len(mixed_l) == 0:
        return zero, stats
    wide = torch.promote_types(rep_u.dtype, torch.float32)  # half inputs: the loss in float32
    with torch.no_grad():
        feat_l, ll = _patches(rep_l.to(wide), n)[mixed_l], ll[mixed_l]  # (P_l, D, pixels)
        onehot = torch.stack([ll == 0, ll == 1], 1).to(wide)  # (P_l, 2, pixels)
        protos = torch.einsum("pkx,pdx->pkd", onehot, feat_l) / onehot.sum(2, keepdim=True)  # (P_l, 2, D)
        r_u = busseg_ops.patch_entropy_hardness(prob_u.to(wide), num_patches=n).flatten()[mixed_u]
        r_l = busseg_ops.patch_entropy_hardness(prob_l.to(wide), num_patches=n).flatten()[mixed_l]
        pair = (r_u[:, None] - r_l[None, :]).abs().argmin(1)
    z = _patches(rep_u, n)[mixed_u].transpose(1, 2).to(wide)  # (P_u, pixels, D); float32 at least
    lab, proto = lu[mixed_u], protos[pair]  # (P_u, pixels), (P_u, 2, D)
    with torch.no_grad():
        closer = torch.einsum("pxd,pkd->pxk", z.detach(), proto).argmax(2)
        anchor = (closer == lab) & (lab != IGNORE)
    own = lab.clamp(0, 1)
    cos = F.cosine_similarity(z[:, :, None, :], proto[:, None, :, :], dim=-1)  # (P_u, pixels, 2)
    cos_own, cos_other = cos.gather(2, own[..., None])[..., 0], cos.gather(2, 1 - own[..., None])[..., 0]
    per_pixel = F.softplus((cos_other - cos_own) / temperature)  # CE of the 2-way softmax, target: own
    groups = torch.stack([anchor & (lab == 0), anchor & (lab == 1)], 2)  # (P_u, pixels, 2)
    count = groups.sum(1)  # (P_u, 2)
    live = count > 0
    if not live.any():
        return zero, stats
    weight = (groups.to(per_pixel.dtype) / count.clamp(min=1)[:, None, :]).sum(2) / live.sum()
    loss = (per_pixel * weight).sum()
    with torch.no_grad():
        a = anchor
        stats.update(
            c_anchors=a.sum().float(),
            c_anchors0=(a & (lab == 0)).sum().float(),
            c_anchors1=(a & (lab == 1)).sum().float(),
            c_agree=a.sum().float() / (lab != IGNORE).sum().clamp(min=1),  # share the feature filter keeps
            c_negatives=torch.tensor(1.0),
            c_cos_pos=cos_own.detach()[a].float().mean(),
            c_cos_neg=cos_other.detach()[a].float().mean(),
        )
    return loss, stats


@torch.no_grad()
def contrastive_stats(anchors, labels, positives, negatives, negative_labels, bank) -> dict:
    """Diagnosis of the contrastive term (logged per step): anchors per class, negatives per
    anchor, bank fill, and the mean cosine of an anchor to its positive and to its negatives."""
    z, zn = F.normalize(anchors.float(), dim=1), F.normalize(negatives.float(), dim=1)
    out = {"c_anchors": float(len(z)), "c_bank": float(bank.count.sum())}
    cos_pos, cos_neg, negs = [], [], []
    for c, p in enumerate(positives):
        mine, other = z[labels == c], zn[negative_labels != c]
        out[f"c_anchors{c}"] = float(len(mine))
        if len(mine) == 0 or p is None:
            continue
        cos_pos.append(mine @ F.normalize(p.float(), dim=0))
        negs.append(float(len(other)))
        if len(other):  # mean over pairs = <mean of anchors, mean of negatives>
            cos_neg.append(mine.mean(0) @ other.mean(0))
    if cos_pos:
        out["c_cos_pos"] = float(torch.cat(cos_pos).mean())
        out["c_negatives"] = sum(negs) / len(negs)
    if cos_neg:
        out["c_cos_neg"] = float(torch.stack(cos_neg).mean())
    return {k: torch.tensor(v) for k, v in out.items()}
