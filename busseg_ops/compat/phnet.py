"""Drop-in for PH-Net's public code (jjjsyyy/PH-Net, model/patch_helper.py): the same functions,
signatures, return structures and random draws, on busseg_ops' ops and in fewer copies. Where a
function cannot behave exactly as upstream its docstring says so. Porting: docs/porting.md.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

import busseg_ops

__all__ = [
    "get_patchs",
    "devide_into_patchs",
    "compute_hard_ratio",
    "generate_patch_mask",
    "generate_patch_data",
    "count_lu_couple",
    "patch_contrast",
]

MIX_TYPES = ("easy_easy", "easy_hard", "easy_rand")

#: Upstream divides the entropy by ``torch.log(torch.tensor(2.))``: log 2 rounded to float32.
_LOG2_FLOAT32 = float(torch.log(torch.tensor(2.0)))


def _patch_count(patch_num) -> int:
    """Upstream passes patch_num through int(); an int-valued float is accepted as it is there."""
    if isinstance(patch_num, bool) or not isinstance(patch_num, (int, float)) or int(patch_num) != patch_num:
        raise ValueError(f"patch_num must be a positive integer, got {patch_num!r}")
    if patch_num < 1:
        raise ValueError(f"patch_num must be >= 1, got {patch_num}")
    return int(patch_num)


def _check_divides(name: str, t, n: int, min_dim: int = 3) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() < min_dim:
        raise ValueError(f"{name} must be a tensor (B, ..., H, W), got {getattr(t, 'shape', type(t).__name__)}")
    H, W = t.shape[-2:]
    if H % n or W % n:
        raise ValueError(f"{name}: patch_num {n} does not divide its size {H}×{W}")


def get_patchs(input, patch_num):
    """(B, ..., H, W) -> (B, N, N, ..., H/N, W/N), patch [b, i, j] = rows i·H/N.., columns
    j·W/N.. of image b. A fresh contiguous tensor, as upstream's (one copy instead of two)."""
    n = _patch_count(patch_num)
    _check_divides("input", input, n)
    B, *mid, H, W = input.shape
    h, w = H // n, W // n
    x = input.reshape(B, -1, n, h, n, w).permute(0, 2, 4, 1, 3, 5)
    return x.clone(memory_format=torch.contiguous_format).view(B, n, n, *mid, h, w)


def devide_into_patchs(image, label, logit, pred, patch_num):
    """``get_patchs`` of each: image (B, C, H, W), label and logit (B, H, W), pred (B, K, H, W)."""
    for name, t in (("image", image), ("label", label), ("logit", logit), ("pred", pred)):
        _check_divides(name, t, _patch_count(patch_num))
    return tuple(get_patchs(t, patch_num) for t in (image, label, logit, pred))


def _hardness(prob: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """Upstream's hard ratio of probability maps (B, K, H, W) per patch: busseg_ops' normalised
    entropy (divided by log K) rescaled to upstream's division by float32 log 2."""
    with torch.no_grad():
        r = busseg_ops.patch_entropy_hardness(prob, patch_size=(patch_h, patch_w))
        return r * (math.log(prob.shape[1]) / _LOG2_FLOAT32)


def compute_hard_ratio(pred):
    """Mean over each patch of -sum_k p_k log(p_k + 1e-10) / log 2, for probability patches
    (..., K, h, w) (e.g. ``devide_into_patchs``' pred): (...). No gradient, as upstream. The
    divisor is log 2 for any K, as upstream (normalised to [0, 1] only for two classes)."""
    if not isinstance(pred, torch.Tensor) or pred.dim() < 3:
        raise ValueError(f"pred must be probability patches (..., K, h, w), got {getattr(pred, 'shape', pred)!r}")
    *lead, K, h, w = pred.shape
    return _hardness(pred.reshape(-1, K, h, w), h, w).view(lead)


def count_lu_couple(ratio_l, ratio_u):
    """For each unlabelled patch, the labelled patch of nearest hardness (first on ties): (n_u,)."""
    if ratio_l.dim() != 1 or ratio_u.dim() != 1:
        raise ValueError(f"ratio_l and ratio_u must be 1-D, got {tuple(ratio_l.shape)} and {tuple(ratio_u.shape)}")
    return (ratio_u[:, None] - ratio_l[None, :]).abs().argmin(-1)


def generate_patch_mask(hard_ratio, ex_ratio=40, alpha=30):
    """``(easy_mask, hard_mask, rand_mask)``, each (N, N) bool on the CPU, as upstream: with
    patches sorted by hardness (torch.sort, ascending) and e = round(N²·int(ex_ratio)/100), the
    e+1 easiest and the e+1 hardest; and ``round(np.random.uniform(0.1 N², 0.5 N²))`` patches
    chosen by ``random.sample`` among the round(N²(1 - int(alpha)/100)) easiest (the others are
    shielded). One NumPy and one Python global-RNG call, in upstream's order."""
    if not isinstance(hard_ratio, torch.Tensor) or hard_ratio.dim() != 2:
        raise ValueError(f"hard_ratio must be one image's (N, N) hardness, got {getattr(hard_ratio, 'shape', None)}")
    rows, cols = hard_ratio.shape
    total = rows * cols
    extreme = round(total * int(ex_ratio) / 100)
    order = torch.sort(hard_ratio.detach().cpu().reshape(-1)).indices
    easy = torch.zeros(total, dtype=torch.bool)
    easy[order[: extreme + 1]] = True
    hard = torch.zeros(total, dtype=torch.bool)
    hard[order[-extreme - 1 :]] = True
    pool = round(total * (1 - int(alpha) / 100))
    count = round(np.random.uniform(total * 0.1, total * 0.5))
    if not 0 <= count <= pool:
        raise ValueError(
            f"alpha={alpha} leaves {pool} of {total} patches to mix from, but {count} were drawn to be mixed "
            f"(upstream's random.sample fails here too)"
        )
    rand = torch.zeros(total, dtype=torch.bool)
    rand[order[torch.tensor(random.sample(range(pool), count), dtype=torch.long)]] = True
    return easy.view(rows, cols), hard.view(rows, cols), rand.view(rows, cols)


def _merge(patches: torch.Tensor, source_image: torch.Tensor, source_patch: torch.Tensor) -> torch.Tensor:
    """Output patch [b, p] = patches[source_image[b, p], source_patch[b, p]], merged back into
    maps (B, ..., N*h, N*w): one gather, one copy into the map layout."""
    B, n, m = patches.shape[:3]
    *mid, h, w = patches.shape[3:]
    device = patches.device
    source_patch = source_patch.to(device)
    picked = patches[source_image.to(device), source_patch // m, source_patch % m].view(B, n, m, *mid, h, w)
    k = len(mid)
    merged = picked.permute(0, *range(3, 3 + k), 1, 3 + k, 2, 4 + k).reshape(B, *mid, n * h, m * w)
    return merged.contiguous()  # (reshape returns a view for 1×1 patches)


def generate_patch_data(image, label, logit, hard_ratio, ex_ratio=40, alpha=30, mix_type="easy_easy"):
    """Upstream's patch mixing of patch tensors image (B, N, N, C, h, w), label and logit
    (B, N, N, h, w) by ``hard_ratio`` (B, N, N); returns the merged maps ``(new_image, new_label,
    new_logit)`` (B, C, H, W), (B, H, W), (B, H, W).

    Masks are drawn image by image (``generate_patch_mask``, same RNG calls and order). Image i's
    easy patches take, in patch order, image i+1's easy ("easy_easy") or hard ("easy_hard")
    patches; with "easy_rand" its rand patches take the same patches of image i+1 as upstream's
    in-place loop leaves them (the last image reads image 0 after image 0 was mixed).

    Differs from upstream: the given patch tensors are not modified (upstream writes the mix into
    them before merging); invalid arguments raise ValueError (upstream: AssertionError)."""
    if mix_type not in MIX_TYPES:
        raise ValueError(f"mix_type must be one of {MIX_TYPES}, got {mix_type!r}")
    if not isinstance(image, torch.Tensor) or image.dim() != 6:
        raise ValueError(f"image must be patches (B, N, N, C, h, w), got {getattr(image, 'shape', None)}")
    B, n, m = image.shape[:3]
    for name, t in (("label", label), ("logit", logit)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or tuple(t.shape[:3]) != (B, n, m):
            raise ValueError(f"{name} must be patches (B, N, N, h, w) = ({B}, {n}, {m}, h, w), got {tuple(t.shape)}")
    if not isinstance(hard_ratio, torch.Tensor) or tuple(hard_ratio.shape) != (B, n, m):
        raise ValueError(f"hard_ratio must be (B, N, N) = {(B, n, m)}, got {getattr(hard_ratio, 'shape', None)}")
    total = n * m
    source_image = torch.arange(B)[:, None].repeat(1, total)
    source_patch = torch.arange(total).repeat(B, 1)
    masks = [[mask.reshape(-1) for mask in generate_patch_mask(hard_ratio[i], ex_ratio, alpha)] for i in range(B)]
    for i in range(B):
        easy, _, rand = masks[i]
        j = (i + 1) % B
        if mix_type == "easy_rand":  # reads image j as it is now (mixed already when j = 0)
            source_image[i, rand] = source_image[j, rand]
            source_patch[i, rand] = source_patch[j, rand]
        else:  # reads image j's patches as they were before any mixing
            donor = masks[j][0 if mix_type == "easy_easy" else 1]
            source_image[i, easy] = j
            source_patch[i, easy] = donor.nonzero()[:, 0]
    return tuple(_merge(t, source_image, source_patch) for t in (image, label, logit))


# ---- patch contrast ----------------------------------------------------------------------------


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """F.interpolate, skipped when x is already at ``size`` (bilinear with align_corners=True and
    nearest are then exact copies)."""
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _patch_pixels(x: torch.Tensor, chosen: torch.Tensor, n: int, first_image: int = 0) -> torch.Tensor:
    """Pixels of the chosen patches, chosen (b, N, N) bool, of maps x (first_image + b, C, H, W):
    (patches, pixels, C), patches in (b, i, j) order, pixels row-major inside each patch. One
    gather from the (B, C, HW) view, so the gradient is one scatter straight into x's layout."""
    H, W = x.shape[2:]
    h, w = H // n, W // n
    b, i, j = chosen.nonzero(as_tuple=True)
    rows = i[:, None, None] * h + torch.arange(h, device=b.device)[None, :, None]
    cols = j[:, None, None] * w + torch.arange(w, device=b.device)[None, None, :]
    pixels = (rows * W + cols).reshape(-1, h * w)
    return x.flatten(2)[(b + first_image)[:, None], :, pixels]


def _every_class(onehot: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, N) bool: patches in which every class channel of the one-hot map has a nonzero sum."""
    B, K, H, W = onehot.shape
    return onehot.reshape(B, K, n, H // n, n, W // n).sum((3, 5)).bool().all(1)


def patch_contrast(
    prob_l_teacher, prob_u_teacher, rep_all, rep_all_teacher, label_l_small, label_u_small, patch_num, feat_size, temp
):
    """PH-Net's patch contrastive loss, upstream's value and gradients (to ``rep_all``, the
    student's representation of the labelled then the unlabelled images).

    At ``feat_size``: one-hot labels (nearest), teacher probabilities and representations
    (bilinear, align_corners=True). Patches that hold every class are used; each unlabelled one is
    matched to the labelled patch of nearest hardness, whose per-class mean teacher features are
    its prototypes. A pixel is an anchor of class c when argmax softmax(normalize(<z, prototypes>))
    is c and its pseudo-label is c; per patch and class, the mean over anchors of
    -log(e^{cos(z, p_c)/temp} / (e^{cos(z, p_c)/temp} + e^{cos(z, p_{1-c})/temp})); the loss is the
    mean over (patch, class) groups with anchors. Computed for all anchors at once.

    Differs from upstream: with no labelled patch holding every class the loss is 0 (upstream
    fails in argmin); different labelled and unlabelled batch sizes are an error (upstream sizes
    both masks by the labelled batch); a group whose loss is NaN because of NaN features is not
    skipped (upstream skips any NaN group; here only groups without anchors); hardness and
    products are summed in another order, so a near-tie (within float rounding) in the patch
    matching or the class argmax may resolve differently. The negative is prototype (1 - c) mod K,
    upstream's ``i_proto[1 - c]``: meaningful for two classes."""
    n = _patch_count(patch_num)
    if not (isinstance(feat_size, (tuple, list, torch.Size)) and len(feat_size) == 2):
        raise ValueError(f"feat_size must be (h, w), got {feat_size!r}")
    size = (int(feat_size[0]), int(feat_size[1]))
    if size[0] % n or size[1] % n:
        raise ValueError(f"patch_num {n} does not divide feat_size {size}")
    for name, t in (
        ("prob_l_teacher", prob_l_teacher),
        ("prob_u_teacher", prob_u_teacher),
        ("rep_all", rep_all),
        ("rep_all_teacher", rep_all_teacher),
        ("label_l_small", label_l_small),
        ("label_u_small", label_u_small),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be (B, C, H, W), got {getattr(t, 'shape', type(t).__name__)}")
    num_labeled, K = prob_l_teacher.shape[:2]
    if prob_u_teacher.shape[0] != num_labeled:
        raise ValueError(
            f"prob_u_teacher has {prob_u_teacher.shape[0]} images, prob_l_teacher {num_labeled}: upstream needs "
            "as many unlabelled as labelled images"
        )
    if rep_all.shape[0] != 2 * num_labeled or rep_all_teacher.shape[0] < num_labeled:
        raise ValueError(
            f"rep_all must hold the {num_labeled} labelled then {num_labeled} unlabelled images, got "
            f"{rep_all.shape[0]} (rep_all_teacher: {rep_all_teacher.shape[0]})"
        )
    for name, t in (("label_l_small", label_l_small), ("label_u_small", label_u_small)):
        if t.shape[:2] != (num_labeled, K):
            raise ValueError(f"{name} must be one-hot (B, K, h, w) = ({num_labeled}, {K}, h, w), got {tuple(t.shape)}")

    label_l = _resize(label_l_small, size, "nearest")
    label_u = _resize(label_u_small, size, "nearest")
    mixed_l = _every_class(label_l, n)
    mixed_u = _every_class(label_u, n)
    if not bool(mixed_u.any()):
        return torch.tensor(0.0, device=rep_all.device) * rep_all.sum()
    if not bool(mixed_l.any()):
        return 0 * rep_all.sum()
    h, w = size[0] // n, size[1] // n
    hard_l = _hardness(_resize(prob_l_teacher, size, "bilinear"), h, w)[mixed_l]
    hard_u = _hardness(_resize(prob_u_teacher, size, "bilinear"), h, w)[mixed_u]
    match = count_lu_couple(hard_l, hard_u)

    with torch.no_grad():
        teacher = _resize(rep_all_teacher[:num_labeled].detach(), size, "bilinear")
        in_class = (_patch_pixels(label_l, mixed_l, n) != 0).to(teacher.dtype)  # (n_l, pixels, K)
        sums = torch.bmm(in_class.transpose(1, 2), _patch_pixels(teacher, mixed_l, n))  # (n_l, K, D)
        prototypes = (sums / in_class.sum(1)[:, :, None])[match]  # (n_u, K, D)
    if tuple(rep_all.shape[2:]) == size:  # take the anchors from rep_all itself: one gradient buffer
        rep_u, first_u = rep_all, num_labeled
    else:
        rep_u, first_u = _resize(rep_all[num_labeled:], size, "bilinear"), 0
    z = _patch_pixels(rep_u, mixed_u, n, first_u)  # (n_u, pixels, D), the student's anchors-to-be
    pseudo = _patch_pixels(label_u, mixed_u, n) != 0  # (n_u, pixels, K)
    with torch.no_grad():
        dots = torch.bmm(z.detach(), prototypes.transpose(1, 2))
        predicted = F.softmax(F.normalize(dots, p=2, dim=-1), dim=-1).argmax(-1, keepdim=True)  # (n_u, pixels, 1)
        anchor = pseudo.gather(-1, predicted)[..., 0]
        groups = F.one_hot(predicted[..., 0], K).bool() & anchor[..., None]  # (n_u, pixels, K)
        counts = groups.sum(1)  # anchors per (patch, class)
    if not bool((counts > 0).any()):
        return 0 * rep_all.sum()
    cos = torch.bmm(F.normalize(z, dim=-1, eps=1e-8), F.normalize(prototypes, dim=-1, eps=1e-8).transpose(1, 2))
    positive = cos.gather(-1, predicted)[..., 0] / temp
    negative = cos.gather(-1, (1 - predicted) % K)[..., 0] / temp
    per_pixel = torch.logaddexp(positive, negative) - positive
    group_sum = torch.where(groups, per_pixel[..., None], 0).sum(1)
    kept = counts > 0
    return (group_sum[kept] / counts[kept]).mean()
