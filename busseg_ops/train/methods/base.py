"""What every method shares: the supervised losses, U2PL's unlabelled-loss pieces, the settings of the
pseudo-label loss, the segmentation networks, and `Method`, the base whose class attributes and
class methods are a method's record in the registry (methods/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import busseg_ops

from .. import augment
from ..errors import UserError
from ..settings import setting

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


def class_loss(cls_logits: torch.Tensor, lab: dict, unl: dict | None) -> torch.Tensor:
    """Cross-entropy of the image-class head (rows: the labelled batch, then the unlabelled one) over
    the images whose class is known (cls ≥ 0); a zero in the graph when none is."""
    target = torch.as_tensor(lab["cls"])
    if unl is not None:
        target = torch.cat([target, torch.as_tensor(unl["cls"])])
    target = target.to(cls_logits.device)
    known = target >= 0
    return F.cross_entropy(cls_logits[known], target[known]) if known.any() else cls_logits.sum() * 0


@torch.no_grad()
def teacher_train_forward(teacher, x: torch.Tensor, **heads) -> dict:
    """U2PL's second teacher forward: in train mode (BatchNorm on the batch's statistics, which it
    also folds into its own running statistics; dropout on), without gradients; back to eval after."""
    teacher.train()
    try:
        return teacher(x, **heads)
    finally:
        teacher.eval()


@dataclass
class PseudoLabelSettings:
    """cfg.pseudo: the unlabelled loss L_u on the teacher's pseudo-labels, shared by the methods
    that have one."""

    title: ClassVar[str] = "pseudo-labels and L_u (rabusseg, phnet; --gamma: phnet, semiseg_caw)"
    lambda_u: float = setting(1.0, "weight of the unlabelled loss L_u (rabusseg, phnet)", non_negative=True)
    drop_percent: float = setting(
        80.0,
        "upstream drop_percent: keep this %% of the unlabelled pixels at the start (drop the most uncertain "
        "100 − p %%), annealed linearly to keeping all",
        within="(0, 100]",
    )
    teacher_train_mode: bool = setting(
        True,
        "rabusseg, phnet: the teacher's second forward, on the student's batch (labelled + mixed unlabelled), runs "
        "in train mode as U2PL's (BatchNorm batch statistics, dropout on): L_u's uncertainty (phnet: also HPC's "
        "probabilities and prototypes) comes from it, and the teacher's BN running statistics are its own (the EMA "
        "averages the parameters only). Off: eval mode, BN statistics an EMA of the student's",
    )
    cutmix_p: float = setting(
        1.0, "probability of a cutmix box per unlabelled image (phnet --no-apa too)", within="[0, 1]"
    )
    gamma: float = setting(0.9, "confidence threshold of the pseudo-labels (phnet, semiseg_caw)", within="[0, 1]")


RESNET_MODELS = ("deeplab",)  # the segmentation networks with a ResNet backbone


def resnet_options(cfg) -> dict:
    return dict(stem=cfg.stem, multi_grid=cfg.multi_grid or None, zero_init_residual=cfg.zero_init_residual)


def segmentation_network(cfg, **heads: bool):
    """--model's network (2 classes; (B, 1, H, W) gray input whatever `in_channels` is, see
    models/inputs.py). `heads`: the heads the method owns, each with whether its settings use it:
    rep (PH-Net's projector, --rep-dim), proj (RA-BUSSeg's relation projection, --proj-dim); those
    unused are dropped. Every head a network was built with before each method got only its own
    (the U-Net and DeepLab: both; MALUNet, UNeXt: the method's) is still drawn, so that a seed gives
    the initial weights and the random stream it always gave."""
    from ... import models

    dims = {"rep": cfg.rep_dim, "proj": cfg.proj_dim}
    drawn = dims if cfg.model in ("unet", "deeplab") else heads
    kw = dict(in_channels=cfg.in_channels, gray_input=True, dropout=cfg.dropout)
    kw.update({f"{kind}_dim": dim if kind in drawn else 0 for kind, dim in dims.items()})
    if cfg.model == "deeplab":
        net = models.DeepLabV3Plus(2, backbone=cfg.backbone, **kw, **resnet_options(cfg))
    elif cfg.model == "unet":
        # a projector drawn but unused has the shape it always had (stride 1), so a seed still gives the random
        # stream it always gave (the demo's numbers); phnet's own projector reads at --unet-rep-stride
        stride = cfg.unet_rep_stride if heads.get("rep") else 1
        net = models.UNet(2, base=cfg.unet_base, encoder_dropout=cfg.encoder_dropout, rep_stride=stride, **kw)
    else:  # MALUNet, UNeXt: their public configs
        net = {"malunet": models.MALUNet, "unext": models.UNeXt}[cfg.model](2, **kw)
    for kind in dims:
        if not heads.get(kind):
            setattr(net.heads, f"{kind}_head", None)
    return net


def head(network, kind: str) -> list:
    """[the network's `kind` head] ("rep" or "proj"), or [] when it has none."""
    module = getattr(network.heads, f"{kind}_head", None)
    return [] if module is None else [module]


class Method:
    """Base: the supervised-only step. A subclass is a method: its name, summary (--help), settings
    group (cfg.<name>), network, checks and training step; it adds the unlabelled terms."""

    name: ClassVar[str]
    summary: ClassVar[str]
    settings: ClassVar[type | None] = None  # its config group, cfg.<name>
    uses_unlabeled = False
    trains_teacher = False  # runs the teacher in train mode: its BN statistics are its own (engine EMA)

    @classmethod
    def check(cls, cfg) -> None:
        """Settings that are valid alone but not for this method (before any data is read)."""
        if cfg.backbone == "unet":
            raise UserError("--backbone unet: only lanet takes the U-Net encoder as a backbone; use --model unet")
        if cfg.pretrained is not None and cfg.model not in RESNET_MODELS:
            raise UserError(
                "--pretrained: this network has no ResNet backbone (--model deeplab, or lanet with --backbone resnetNN)"
            )

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        """The network, randomly initialised (the Trainer loads --pretrained)."""
        return segmentation_network(cfg)

    @classmethod
    def check_network(cls, cfg, model) -> None:
        """Settings that do not fit the network built for this crop (before the first step)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def frozen(self, network, ctx: dict) -> list:
        """The parts (modules) of the network that get no gradient in the epoch of `ctx`: the engine
        freezes them for the epoch, so that DDP syncs exactly what trains."""
        return []

    @property
    def owns_teacher_bn(self) -> bool:
        """The teacher's BatchNorm running statistics come from its own train-mode forwards
        (U2PL), so the engine's EMA must leave them alone after the supervised-only epochs."""
        return self.trains_teacher and self.cfg.pseudo.teacher_train_mode

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
