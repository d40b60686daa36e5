"""Training steps of the methods, all on the mean-teacher framework (the engine keeps the EMA
teacher and evaluates it). A method maps one labelled and one unlabelled batch to a loss.

  suponly    L = L_s on the labelled batch.
  rabusseg   L = L_s + λ_u·L_u + λ₁·L_ARP + λ₂·L_CRA (RA-BUSSeg; λ's = 1, seed supp. Table 1).
             L_u: CE on box-cutmixed unlabelled images against the teacher's mixed pseudo-labels;
             as U2PL's drop_percent p, the most uncertain (100 − p)·(1 − epoch/epochs) % of the
             pixels (teacher entropy) are dropped and the mean is weighted by all/kept pixels.
             The entropy is U2PL's: the teacher's second forward, in train mode on the student's
             batch (--teacher-train-mode; it also keeps the teacher's own BN statistics).
             ARP and CRA switch off for the ablations; the CRA proxy strategy and number of
             scales are options.
  phnet      PH-Net: adaptive patch cutmix (APA: --apa-mix, the released easy_easy swap by
             default), L_u as the authors' loss_helper.py (--unsup-form code: rabusseg's filtered
             L_u; paper: confidence ≥ γ), hard-patch contrastive loss (HPC; --hpc-form code: the
             released patch_contrast, prototypes from the teacher's labelled features; paper:
             Eq. 13-15 with the class memory bank, MB); all switchable.
  (docs/upstream_audit.md: each of these against the public code, line by line.)
  lanet      LA-Net's two-stage sequential training: stage 1 segmentation on location labels;
             stage 2 L = λ·L_cls + (1−λ)·(L_sloc-w + α·L_sloc-wo) with pseudo location labels
             binarize(P_pixel > 0.5) kept only for images whose class confidence exceeds τ.
  semiseg_caw ClassElevateSeg pre-training, then joint training with WGM-weighted losses.
During the first `warmup_epochs` every method trains on the labelled batch only. L_s is
`--criterion`: CE, OHEM CE (U2PL/RA-BUSSeg's CriterionOhem) or CE + soft Dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import busseg_ops

from .. import models
from . import augment

IGNORE = augment.IGNORE


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with ignore 255; 0 (still attached to the graph) when every pixel is ignored."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def ohem_keep(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """The pixels OHEM trains on (B, H, W) bool, as upstream's OhemCrossEntropy2dTensor: a valid
    pixel is kept when the softmax probability of its true class is ≤ the threshold, which is
    `thresh`, raised to the min_kept-th smallest such probability when that is larger (so at least
    min_kept pixels stay). Fewer valid pixels than min_kept, or min_kept ≤ 0: every valid pixel."""
    valid = target != IGNORE
    n_valid = int(valid.sum())
    if min_kept <= 0 or min_kept > n_valid or n_valid == 0:
        return valid
    with torch.no_grad():
        prob = torch.softmax(logits.detach(), 1).gather(1, target.masked_fill(~valid, 0)[:, None])[:, 0]
        prob = prob.masked_fill(~valid, 1.0)
        kth = prob.flatten().kthvalue(min_kept).values
        threshold = max(float(thresh), float(kth))
        return valid & (prob <= threshold)


def ohem_ce(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000) -> torch.Tensor:
    """Cross-entropy averaged over the pixels :func:`ohem_keep` keeps."""
    return ce(logits, target.masked_fill(~ohem_keep(logits, target, thresh, min_kept), IGNORE))


# Upstream's OHEM batch: RA-BUSSeg's BUSI config crops 512² with 2 images per GPU, where min_kept 100000
# keeps at least 19 % of the pixels.
UPSTREAM_OHEM_PIXELS = 2 * 512 * 512


def ohem_min_kept(cfg, target: torch.Tensor) -> int:
    """OHEM's min_kept for this batch: with `ohem_scale`, upstream's share of its batch's pixels."""
    if not cfg.ohem_scale:
        return cfg.ohem_min_kept
    return round(cfg.ohem_min_kept * target.numel() / UPSTREAM_OHEM_PIXELS)


def unreliable_percent(drop_percent: float, epoch: int, epochs: int) -> float:
    """U2PL's schedule: with drop_percent p, the share of most uncertain unlabelled pixels dropped at
    `epoch` (0-based) is (100 − p)·(1 − epoch/epochs) %, from 100 − p down towards 0."""
    return (100.0 - drop_percent) * (1.0 - epoch / epochs)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice of the lesion class over the batch (ignore 255): the SSL4MIS companion of CE
    that gets a from-scratch network off the all-background solution quickly."""
    valid = (target != IGNORE).float()
    p = torch.softmax(logits, 1)[:, 1] * valid
    g = (target == 1).float()
    return 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)


def unreliable_filtered_ce(pred: torch.Tensor, target: torch.Tensor, prob: torch.Tensor, drop: float) -> torch.Tensor:
    """U2PL's compute_unsupervised_loss (RA-BUSSeg's base; PH-Net's deleted loss_helper.py is the same):
    CE over the pixels left after dropping the `drop` % most uncertain (entropy of `prob`,
    batch-wide), weighted by all pixels / kept pixels."""
    loss = busseg_ops.entropy_filtered_cross_entropy(pred, target, prob, drop)
    valid = int((target != IGNORE).sum())
    kept = valid - int(drop / 100.0 * valid)  # the op drops floor(drop % of the valid pixels)
    return loss * (target.numel() / max(kept, 1))


def entropy_keep(prob: torch.Tensor, drop: float) -> torch.Tensor:
    """(B, H, W) bool: the pixels :func:`unreliable_filtered_ce` keeps, per image (diagnosis)."""
    entropy = -(prob * torch.log(prob + 1e-10)).sum(1).flatten(1)
    keep = torch.ones_like(entropy, dtype=torch.bool)
    n = int(drop / 100.0 * entropy.shape[1])
    if n > 0:
        keep.scatter_(1, entropy.topk(n, dim=1).indices, False)
    return keep.view(prob.shape[0], *prob.shape[2:])


@torch.no_grad()
def teacher_train_forward(teacher, x: torch.Tensor, **heads) -> dict:
    """U2PL's second teacher forward: in train mode (BatchNorm on the batch's statistics, which it
    also folds into its own running statistics; dropout on), without gradients; back to eval after."""
    teacher.train()
    try:
        return teacher(x, **heads)
    finally:
        teacher.eval()


class Method:
    """Base: the supervised-only step. Subclasses add the unlabelled terms."""

    name = "suponly"
    uses_unlabeled = False
    trains_teacher = False  # runs the teacher in train mode: its BN statistics are its own (engine EMA)

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def owns_teacher_bn(self) -> bool:
        """The teacher's BatchNorm running statistics come from its own train-mode forwards
        (U2PL), so the engine's EMA must leave them alone after the supervised-only epochs."""
        return self.trains_teacher and self.cfg.teacher_train_mode

    def sup(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L_s by `criterion`: ce, ohem (upstream's default) or ce+dice."""
        c = self.cfg
        if c.criterion == "ohem":
            return ohem_ce(logits, target, c.ohem_thresh, ohem_min_kept(c, target))
        loss = ce(logits, target)
        if c.criterion == "ce+dice":
            loss = loss + soft_dice_loss(logits, target)
        return loss

    def __call__(self, student, teacher, lab: dict, unl: dict | None, ctx: dict):
        x, y = lab["image"], lab["mask"]
        loss_s = self.sup(student(x)["pred"], y)
        return loss_s, {"loss_s": loss_s.detach()}

    def parameters(self) -> list:
        """Trainable parameters the method owns (optimised with the network's)."""
        return []

    def pseudo_label_keep(self, prob: torch.Tensor, cls: torch.Tensor | None, ctx: dict) -> torch.Tensor | None:
        """(B, H, W) bool: the pixels of the teacher's pseudo-labels (class probabilities prob
        (B, 2, H, W), class probabilities cls (B, K) or None) that this method's unsupervised loss
        counts; None for a method without pseudo-labels. Used only by the engine's pseudo-label
        check (diagnosis); it must follow the filter of the training step."""
        return None

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
    trains_teacher = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.cra and not hasattr(busseg_ops, "greedy_proxy_sampling"):
            raise RuntimeError(
                "rabusseg with CRA needs busseg_ops.greedy_proxy_sampling and the other "
                "CRA ops (issue 3), which this build lacks; pass --no-cra for ARP only"
            )
        self.arp = models.AdjacentRelationPropagation(kernel_size=cfg.arp_kernel)
        self.cra = models.CrossLayerRelationAlignment(cfg.num_proxies, cfg.cra_scales, cfg.cra_strategy)

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg
        if unl is None or ctx.get("warmup", False):  # U2PL's sup_only epochs: L_s alone, ARP/CRA too wait
            return super().__call__(student, teacher, lab, unl, ctx)
        xl, yl = lab["image"], lab["mask"]
        size = xl.shape[-2:]
        logs = {}
        xu, valid = unl["image"], unl["mask"] != IGNORE
        with torch.no_grad():
            prob = torch.softmax(teacher(xu)["pred"], 1)
            pl = prob.argmax(1).masked_fill(~valid, IGNORE)
        box = augment.cutmix_box(len(xu), *size, p=c.cutmix_p)
        xu, pl_u, prob_u = augment.mix(box, xu, pl, prob)
        x, targets, nl = torch.cat([xl, xu]), torch.cat([yl, pl_u]), len(xl)
        out = student(x, need_proj=c.arp or c.cra, need_feats=c.cra)
        pred = out["pred"]
        if c.teacher_train_mode:  # U2PL: the uncertainty of the train-mode teacher on the student's batch
            prob_u = torch.softmax(teacher_train_forward(teacher, x)["pred"][nl:], 1)
        loss_s = self.sup(pred[:nl], yl)
        loss = loss_s
        logs["loss_s"] = loss_s.detach()
        drop = unreliable_percent(c.drop_percent, ctx["epoch"], ctx["epochs"])
        loss_u = unreliable_filtered_ce(pred[nl:], pl_u, prob_u, drop)
        loss = loss + c.lambda_u * loss_u
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
        return entropy_keep(prob, unreliable_percent(self.cfg.drop_percent, ctx["epoch"], ctx["epochs"]))


# ----------------------------------------------------------------------------------------------


class PHNet(Method):
    """PH-Net (CVPR 2024). APA by the teacher's patch-entropy hardness (:meth:`patch_mix`; off:
    plain box cutmix). L_u: the authors' (U2PL's) entropy-filtered CE (unsup_form code) or CE
    counted where the teacher's confidence on the mixed image is ≥ γ (paper). HPC: the released
    patch_contrast (hpc_form code) or InfoNCE of reliable hard-patch projector features against
    their class centre (paper; MB: from the memory bank; off: the batch's own class means). The
    teacher's probabilities and features of the mixed batch come from its train-mode forward with
    teacher_train_mode, as U2PL's."""

    name = "phnet"
    uses_unlabeled = True
    trains_teacher = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bank = busseg_ops.ClassMemoryBank(2, cfg.rep_dim, cfg.bank_size)

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg
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
            xm, plm = augment.mix(augment.cutmix_box(len(xu), *xu.shape[-2:], p=c.cutmix_p), xu, pl)
        nl = len(xl)
        x = torch.cat([xl, xm])
        code_hpc = c.hpc and c.hpc_form == "code"
        if c.teacher_train_mode:  # U2PL's second teacher forward, which patch_contrast's inputs come from
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
                pred[nl:], plm, tprob, unreliable_percent(c.drop_percent, ctx["epoch"], ctx["epochs"])
            )
        else:
            loss_u = busseg_ops.confidence_masked_cross_entropy(pred[nl:], plm, tprob, c.gamma)
        loss = loss_s + c.lambda_u * loss_u
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
        c = self.cfg
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
        if self.cfg.unsup_form == "code":
            return entropy_keep(prob, unreliable_percent(self.cfg.drop_percent, ctx["epoch"], ctx["epochs"]))
        return prob.amax(1) >= self.cfg.gamma  # as confidence_masked_cross_entropy

    def contrastive(self, rep, plm, tprob):
        c = self.cfg
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


def bce(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary CE of a (B, 1, H, W) mask head against 0/1 targets, ignoring 255."""
    valid = target != IGNORE
    if not valid.any():
        return mask_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(mask_logits[:, 0][valid], target[valid].float())


class LANet(Method):
    """Two-stage sequential training (LA-Net, MedIA 2023, Eq. 6–7) of the LANet model (sigmoid
    lesion mask + classifier). The unlabelled images are its class-only images: they need class
    labels (`cls` ≥ 0; BUSI and the synthetic set have them)."""

    name = "lanet"
    uses_unlabeled = True

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg
        xl, yl = lab["image"], lab["mask"]
        if ctx["epoch"] < c.stage1_epochs:  # stage 1: L_floc on location labels
            loss = bce(student(xl)["mask_logits"], yl)
            return loss, {"loss_floc": loss.detach()}
        nl = len(xl)
        out = student(xl if unl is None else torch.cat([xl, unl["image"]]))
        logits = out["mask_logits"]
        cls_t = (
            torch.as_tensor(lab["cls"])
            if unl is None
            else torch.cat([torch.as_tensor(lab["cls"]), torch.as_tensor(unl["cls"])])
        )
        cls_t = cls_t.to(logits.device)
        known = cls_t >= 0
        loss_cls = F.cross_entropy(out["cls"][known], cls_t[known]) if known.any() else logits.sum() * 0
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
        confident = cls.amax(1) > self.cfg.tau  # whole images, by their class confidence
        return confident[:, None, None].expand(prob.shape[0], *prob.shape[2:])


class SemiSegCAW(Method):
    """SemiSeg-CAW (2025) on models.SemiSegCAW. Stage 1 (`stage1_epochs`): pre-train the
    ClassElevateSeg auxiliary network (segmentation on the labelled images + classification on
    every image with a class label, the class-only images included). Stage 2: it is frozen and
    guides the main network, trained on L_seg (labelled), L_cls (all class labels) and L_u
    (teacher pseudo-labels, confidence ≥ γ; absent without unlabelled images) combined by the
    weight generation module (WGM; off: static weights 1). Without ClassElevateSeg
    (`class_elevate` off) there is no stage 1: the main network trains from the first step."""

    name = "semiseg_caw"
    uses_unlabeled = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.wgm = models.WeightGenerationModule(3)

    def parameters(self):
        return list(self.wgm.parameters())

    def __call__(self, student, teacher, lab, unl, ctx):
        c = self.cfg
        net = student.module if hasattr(student, "module") else student
        guided = net.aux is not None  # off: the paper's "removing ClassElevateSeg" (--no-class-elevate)
        stage1 = guided and ctx["epoch"] < c.stage1_epochs
        if guided:
            net.aux.requires_grad_(stage1)  # set every step: the stage follows the epoch (and resumes)
            net.freeze_aux = not stage1
            net.aux.train(stage1 and net.training)  # frozen in stage 2: no BN statistics updates
        xl, yl = lab["image"], lab["mask"]
        x = xl if unl is None else torch.cat([xl, unl["image"]])
        cls_t = (
            torch.as_tensor(lab["cls"])
            if unl is None
            else torch.cat([torch.as_tensor(lab["cls"]), torch.as_tensor(unl["cls"])])
        )
        cls_t = cls_t.to(x.device)
        known = cls_t >= 0
        nl = len(xl)
        if stage1:
            out = net.forward_aux(x)
            loss_seg = self.sup(out["pred"][:nl], yl)
            loss_cls = F.cross_entropy(out["cls"][known], cls_t[known]) if known.any() else loss_seg * 0
            return loss_seg + loss_cls, {"loss_aux_seg": loss_seg.detach(), "loss_aux_cls": loss_cls.detach()}
        out = student(x)
        loss_seg = self.sup(out["pred"][:nl], yl)
        loss_cls = F.cross_entropy(out["cls"][known], cls_t[known]) if known.any() else loss_seg * 0
        loss_u = None  # no unlabelled image (every mask known): no pseudo-label term
        if unl is not None:
            with torch.no_grad():
                prob = torch.softmax(teacher(unl["image"])["pred"], 1)
                pl = prob.argmax(1).masked_fill(unl["mask"] == IGNORE, IGNORE)
            loss_u = busseg_ops.confidence_masked_cross_entropy(out["pred"][nl:], pl, prob, c.gamma)
        losses = [loss_seg, loss_cls, loss_u]
        if c.wgm:
            loss, w = self.wgm(losses)
        else:
            loss, w = sum(v for v in losses if v is not None), torch.ones(3)
        logs = {"loss_seg": loss_seg.detach(), "loss_cls": loss_cls.detach(), "w_seg": w[0], "w_cls": w[1]}
        if loss_u is not None:
            logs.update(loss_u=loss_u.detach(), w_u=w[2])
        return loss, logs

    def pseudo_label_keep(self, prob, cls, ctx):
        return prob.amax(1) >= self.cfg.gamma  # as confidence_masked_cross_entropy

    def state_dict(self) -> dict:
        return {"wgm": self.wgm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.wgm.load_state_dict(state["wgm"])


METHODS = {m.name: m for m in (SupOnly, RABUSSeg, PHNet, LANet, SemiSegCAW)}


def build(cfg) -> Method:
    return METHODS[cfg.method](cfg)  # cfg.method is checked by TrainConfig.validate
