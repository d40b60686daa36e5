"""The papers' public code restated from what it computes (no line of theirs), so that the
comparisons need no clone: the references of tests/test_compat.py and the baselines of
benchmarks/bench_compat.py. Each function keeps the upstream formulation and its random draws in
the same order, but runs on any device. With the published files at hand (support/published.py)
tests/test_compat.py checks every function here against them.

RA-BUSSeg (dodooo1/RA-BUSSeg): rabusseg/models/decoder.py `Corr`, rabusseg/utils/loss_helper.py.
PH-Net (jjjsyyy/PH-Net): model/patch_helper.py.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# ---- RA-BUSSeg ---------------------------------------------------------------------------------


def _sqrt_channels(c: int) -> torch.Tensor:
    """Upstream's divisor: the square root of C taken in float32 (a 0-dim tensor)."""
    return torch.tensor(c).float().sqrt()


def corr_forward(feature_in, out, kernel_size=3):
    """`Corr.forward`: {'corr_map': (B, HW, HW) scaled Gram matrix, 'out': the detached logits,
    resized to the feature grid, propagated over each k×k neighbourhood (zero padding) with the
    softmax of scaled feature affinities}."""
    B, C, H, W = feature_in.shape
    value = F.interpolate(out.detach(), (H, W), mode="bilinear", align_corners=True)
    flat = feature_in.flatten(2)
    denom = _sqrt_channels(C)
    corr_map = torch.matmul(flat.transpose(1, 2), flat) / denom
    taps = kernel_size * kernel_size
    keys = F.unfold(feature_in, kernel_size, padding=kernel_size // 2).view(B, C, taps, H * W)
    affinity = torch.einsum("bcp,bckp->bpk", flat, keys) / denom
    weights = affinity.softmax(-1)
    values = F.unfold(value, kernel_size, padding=kernel_size // 2).view(B, value.shape[1], taps, H * W)
    propagated = (values * weights.permute(0, 2, 1)[:, None]).sum(2)
    return {"corr_map": corr_map, "out": propagated.view(B, -1, H, W)}


def first_landmarks(label_flat):
    """One global-RNG draw per image, in image order: a uniform nonzero pixel of the label (255
    counts), or a uniform pixel when there is none. (B,) int64."""
    picks = []
    for row in label_flat:
        nonzero = row.nonzero()[:, 0]
        if nonzero.numel() > 0:
            picks.append(int(nonzero[torch.randint(0, nonzero.numel(), (1,))]))
        else:
            picks.append(int(torch.randint(row.numel(), (1, 1))))
    return torch.tensor(picks)


def landmark_indices(qh, corr_map, label, num_landmarks=64):
    """The greedy landmarks of `orthogonal_landmarks_refine` in selection order, (B, M): per
    image and per step, the cumulative similarity columns are kept, chosen pixels are overwritten
    with 100000 in every column, and the next landmark is the argmin of the column-wise max."""
    B, _, Hh, Wh = qh.shape
    label = F.interpolate(label[:, None].float(), (Hh, Wh), mode="nearest")[:, 0].to(torch.int)
    first = first_landmarks(label.reshape(B, -1))
    picks = torch.empty(B, num_landmarks, dtype=torch.long)
    for b in range(B):
        sims = torch.empty(Hh * Wh, num_landmarks, dtype=qh.dtype, device=corr_map.device)
        chosen = torch.zeros(Hh * Wh, dtype=torch.bool, device=corr_map.device)
        last = int(first[b])
        picks[b, 0] = last
        chosen[last] = True
        for m in range(1, num_landmarks):
            sims[:, m - 1] = corr_map[b, last]
            if m > 1:
                sims[:, m - 1] += sims[:, m - 2]
            sims[chosen, :m] = 100000
            last = int(sims[:, :m].amax(-1).argmin())
            picks[b, m] = last
            chosen[last] = True
    return picks


def orthogonal_landmarks_refine(q1, q2, q3, qh, corr_map, label, num_landmarks=64):
    """Landmark features (B, M, D) of the four layers, gathered with a boolean mask: in pixel
    order, not selection order. Layer 1 (finer grid) at the block's top-left pixel."""
    B, _, Hh, Wh = qh.shape
    _, _, Hl, Wl = q1.shape
    f = math.ceil(Wl / Wh)
    picks = landmark_indices(qh, corr_map, label, num_landmarks).to(qh.device)
    fine = (picks // Wh) * f * Wl + (picks % Wh) * f
    mask_h = torch.zeros(B, Hh * Wh, dtype=torch.bool, device=qh.device).scatter_(1, picks, True)
    mask_l = torch.zeros(B, Hl * Wl, dtype=torch.bool, device=qh.device).scatter_(1, fine, True)

    def select(q, mask):
        return q.flatten(2).transpose(1, 2)[mask].view(B, -1, q.shape[1])

    return select(qh, mask_h), select(q1, mask_l), select(q2, mask_h), select(q3, mask_h)


def compute_rank_loss_landmark(feat_x1, feat_x2, feat_x3, high_feat, corr_map, label):
    """Mean of the three KL(P_deeper || P_shallower) of pixel-to-landmark softmaxes, shallow maps
    resized (detached) to the deepest grid, KLDivLoss(reduction='mean') on log(P + 1e-10)."""
    landmarks = orthogonal_landmarks_refine(feat_x1, feat_x2, feat_x3, high_feat, corr_map, label, 64)
    ref_h, ref_1, ref_2, ref_3 = landmarks
    _, _, H, W = high_feat.shape
    maps = [F.interpolate(f.detach(), (H, W), mode="bilinear", align_corners=True) for f in (feat_x1, feat_x2, feat_x3)]
    probs = [
        torch.einsum("bchw,bnc->bhwn", m, r).softmax(-1)
        for m, r in zip(maps + [high_feat], (ref_1, ref_2, ref_3, ref_h))
    ]
    kl = torch.nn.KLDivLoss(reduction="mean")
    with warnings.catch_warnings():  # torch's notice that "mean" is not "batchmean": upstream's choice
        warnings.simplefilter("ignore", UserWarning)
        return sum(kl((probs[l] + 1e-10).log(), probs[l + 1]) for l in range(3)) / 3


def compute_unsupervised_loss(predict, target):
    B, _, h, w = predict.shape
    return B * h * w / (target != 255).sum() * F.cross_entropy(predict, target, ignore_index=255)


def compute_corr_loss(pred_corr, target):
    return F.cross_entropy(pred_corr, target.long(), ignore_index=255)


def corr_sample(corr_map, h_in, w_in):
    """`Corr.sample`: 128 rows at global-RNG indices drawn from [0, h_in*w_in - 1)."""
    index = torch.randint(0, h_in * w_in - 1, [128])
    return corr_map[:, index, :]


def normalize_corr_map(corr_map, h_in, w_in, h_out, w_out):
    """`Corr.normalize_corr_map`: each of the m rows of (n, m, h_in*w_in), resized bilinearly to
    h_out×w_out, min-max scaled to [0, 1]."""
    n, m, _ = corr_map.shape
    maps = F.interpolate(corr_map.reshape(n * m, 1, h_in, w_in), (h_out, w_out), mode="bilinear", align_corners=True)
    rows = maps.reshape(n * m, -1)
    low = rows.min(1, keepdim=True).values
    return ((rows - low) / (rows.max(1, keepdim=True).values - low)).view(n, m, -1)


# ---- PH-Net ------------------------------------------------------------------------------------


def get_patchs(x, patch_num):
    """(B, ..., H, W) -> (B, N, N, ..., H/N, W/N) by chunking columns then rows and concatenating
    the pieces along new dimensions (the row index comes first)."""
    columns = torch.cat(torch.chunk(x.unsqueeze(1), patch_num, dim=-1), dim=1)
    return torch.cat(torch.chunk(columns.unsqueeze(1), patch_num, dim=-2), dim=1)


def devide_into_patchs(image, label, logit, pred, patch_num):
    return tuple(get_patchs(t, patch_num) for t in (image, label, logit, pred))


def compute_hard_ratio(pred):
    """Mean over each patch's pixels of the class entropy divided by log 2 (float32), for
    probability patches (..., K, h, w), computed on a copy of them (upstream's cost)."""
    with torch.no_grad():
        pred = pred.clone()
        entropy = -(pred * torch.log(pred + 1e-10)).sum(-3)
        return (entropy / torch.log(torch.tensor(2.0))).mean(dim=[-2, -1])


def generate_patch_mask(hard_ratio, ex_ratio=40, alpha=30):
    """(easy, hard, rand) (N, N) bool masks on the CPU: the round(N²·ex/100)+1 lowest / highest
    hardness patches, and round(numpy U(0.1 N², 0.5 N²)) patches drawn by `random.sample` among
    the round(N²(1 - alpha/100)) easiest."""
    rows, cols = hard_ratio.shape
    total = rows * cols
    extreme = round(total * int(ex_ratio) / 100)
    order = torch.sort(hard_ratio.reshape(-1)).indices
    easy = torch.zeros(total, dtype=torch.bool)
    easy[order[: extreme + 1]] = True
    hard = torch.zeros(total, dtype=torch.bool)
    hard[order[-extreme - 1 :]] = True
    pool = round(total * (1 - int(alpha) / 100))
    count = round(np.random.uniform(total * 0.1, total * 0.5))
    rand = torch.zeros(total, dtype=torch.bool)
    rand[order[random.sample(range(0, pool), count)]] = True
    return easy.view(rows, cols), hard.view(rows, cols), rand.view(rows, cols)


def _merge_patches(patches):
    """(B, N, N, ..., h, w) -> (B, ..., N*h, N*w)."""
    k = patches.dim() - 5
    order = (0, *range(3, 3 + k), 1, 3 + k, 2, 4 + k)
    B, n, m = patches.shape[:3]
    h, w = patches.shape[-2:]
    return patches.permute(order).reshape(B, *patches.shape[3:-2], n * h, m * w)


def generate_patch_data(image, label, logit, hard_ratio, ex_ratio=40, alpha=30, mix_type="easy_easy"):
    """Masks per image in batch order; easy patches of image i take the easy (or hard) patches of
    image i+1 in patch order ("easy_easy", "easy_hard"), or the rand patches of image i take the
    same patches of image i+1 as it is at that moment ("easy_rand": image 0 has already been mixed
    when the last image reads it). Before mixing, the easy, hard and rand patches of every image
    are copied out whatever the mix type (upstream's cost). Writes into the given patch tensors,
    then merges them."""
    B = image.shape[0]
    tensors = (image, label, logit)
    masks, picked = [], []
    for i in range(B):
        masks.append(generate_patch_mask(hard_ratio[i], ex_ratio, alpha))
        picked.append([[t[i][mask] for t in tensors] for mask in masks[i]])  # [easy, hard, rand][tensor]
    if mix_type == "easy_rand":
        for i in range(B):
            rand = masks[i][2]
            for t in tensors:
                t[i][rand] = t[(i + 1) % B][rand]
    else:
        donor = 0 if mix_type == "easy_easy" else 1
        for i in range(B):
            for t, source in zip(tensors, picked[(i + 1) % B][donor]):
                t[i][masks[i][0]] = source
    return tuple(_merge_patches(t) for t in tensors)


def count_lu_couple(ratio_l, ratio_u):
    return (ratio_u[:, None] - ratio_l[None]).abs().argmin(-1)


def patch_contrast(
    prob_l_teacher, prob_u_teacher, rep_all, rep_all_teacher, label_l_small, label_u_small, patch_num, feat_size, temp
):
    """Patches holding every class (of the one-hot labels at feat_size); each unlabelled student
    patch is matched to the labelled teacher patch of nearest hardness, whose per-class mean
    features are the prototypes; a pixel is an anchor of class c when the prototypes' (normalised,
    softmaxed) dot products pick c and its pseudo-label is c; one InfoNCE (positive: prototype c,
    negative: prototype 1 - c, cosine / temp) per patch and class, averaged."""
    num_labeled, num_class = prob_l_teacher.shape[:2]
    resize = dict(size=feat_size, mode="bilinear", align_corners=True)
    label_l = get_patchs(F.interpolate(label_l_small, size=feat_size, mode="nearest"), patch_num)
    label_u = get_patchs(F.interpolate(label_u_small, size=feat_size, mode="nearest"), patch_num)
    hard_l = compute_hard_ratio(get_patchs(F.interpolate(prob_l_teacher, **resize), patch_num))
    hard_u = compute_hard_ratio(get_patchs(F.interpolate(prob_u_teacher, **resize), patch_num))
    rep_student = F.interpolate(rep_all, **resize)
    rep_teacher = F.interpolate(rep_all_teacher, **resize)
    student = get_patchs(rep_student, patch_num)[num_labeled:]
    teacher = get_patchs(rep_teacher, patch_num)[:num_labeled]

    mixed_l = label_l.sum(dim=[-2, -1]).bool().all(-1).cpu()
    mixed_u = label_u.sum(dim=[-2, -1]).bool().all(-1).cpu()
    if not mixed_u.any():
        return torch.tensor(0.0) * rep_student.sum()
    feat_u = student[mixed_u].permute(0, 2, 3, 1)
    lab_u = label_u[mixed_u]
    feat_l = teacher[mixed_l].permute(0, 2, 3, 1)
    lab_l = label_l[mixed_l]
    match = count_lu_couple(hard_l[mixed_l], hard_u[mixed_u])

    prototype = torch.stack(
        [
            torch.stack([feat_l[i][lab_l[i, c].bool()].detach().mean(0) for c in range(num_class)])
            for i in range(len(feat_l))
        ]
    )  # (patches, K, D)

    losses = []
    for i in range(len(feat_u)):
        proto = prototype[match[i]]
        dots = torch.stack([torch.matmul(feat_u[i], proto[c]) for c in range(num_class)], -1)
        predicted = F.softmax(F.normalize(dots, p=2, dim=-1), dim=-1).max(-1).indices
        inter = F.one_hot(predicted, num_class).permute(2, 0, 1).float() * lab_u[i]
        for c in range(num_class):
            anchors = feat_u[i][inter[c].bool()]
            candidates = torch.stack([proto[c], proto[1 - c]]).detach()
            logits = torch.cosine_similarity(anchors[:, None], candidates[None], dim=-1)
            loss = F.cross_entropy(logits / temp, torch.zeros(len(anchors), dtype=torch.long, device=anchors.device))
            if loss != loss:  # no anchor: the mean over none is NaN, and the group is skipped
                continue
            losses.append(loss)
    if not losses:
        return 0 * rep_student.sum()
    return torch.stack(losses).mean()
