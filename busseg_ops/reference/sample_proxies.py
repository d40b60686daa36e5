"""sample_proxies' other strategies (RA-BUSSeg supplementary, Table 4) in plain PyTorch: uniform
without replacement, k-means and patch means. Each returns (B, M) distinct int64 pixel indices,
whatever the feature values (NaN and inf included)."""

import torch


def random_proxies(batch, hw, num_proxies, generator, device):
    """Uniform without replacement: the first M of a random permutation per image."""
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(batch, hw, generator=generator, device=gen_device)
    return keys.argsort(1)[:, :num_proxies].to(device)


def _nearest_distinct(feat_flat, centres, allowed=None):
    """For each centre (B, M, C) the nearest pixel of feat_flat (B, C, HW) not taken by an earlier
    centre (and inside ``allowed`` (B, M, HW) when given). (B, M) int64, distinct: a non-finite
    distance (NaN or inf features) ranks after every finite one but before a pixel that is taken
    or not allowed, so a centre never falls back on a taken pixel."""
    B, M, _ = centres.shape
    dist = torch.cdist(centres, feat_flat.transpose(1, 2))  # (B, M, HW)
    dist = torch.where(dist.isfinite(), dist, torch.finfo(dist.dtype).max)
    if allowed is not None:
        dist = dist.masked_fill(~allowed, float("inf"))
    taken = torch.zeros(B, feat_flat.shape[2], dtype=torch.bool, device=feat_flat.device)
    batch = torch.arange(B, device=feat_flat.device)
    out = []
    for m in range(M):
        j = dist[:, m].masked_fill(taken, float("inf")).argmin(1)
        taken[batch, j] = True
        out.append(j)
    return torch.stack(out, 1)


def _kmeans_plus_plus(f, num_proxies, generator):
    """k-means++ seeding: the first centre a uniform pixel, each next one drawn with probability
    proportional to the squared distance to the nearest centre so far. (B, M, C)."""
    B, C, HW = f.shape
    pixels = f.transpose(1, 2)
    gen_device = generator.device if generator is not None else f.device
    first = (torch.rand(B, generator=generator, device=gen_device) * HW).long().clamp_(max=HW - 1)
    centres = [pixels[torch.arange(B), first.to(f.device)]]
    nearest = torch.full((B, HW), float("inf"), dtype=f.dtype, device=f.device)
    for _ in range(num_proxies - 1):
        nearest = torch.minimum(nearest, (pixels - centres[-1][:, None]).square().sum(2))
        weights = torch.nan_to_num(nearest, nan=0.0, posinf=0.0).clamp(min=0)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        pick = torch.multinomial(weights.to(gen_device, torch.float64), 1, generator=generator)
        centres.append(pixels[torch.arange(B), pick[:, 0].to(f.device)])
    return torch.stack(centres, 1)


def kmeans_proxies(feat, num_proxies, iterations, generator):
    """Lloyd's k-means on the pixel features from k-means++ seeds, at most ``iterations`` steps,
    stopping once no assignment changes (the centres are then a fixed point: further steps would
    return the same); the proxies are the pixels nearest to the final centres, kept distinct
    (nearest pixel not taken by an earlier centre)."""
    B, C, H, W = feat.shape
    f = feat.reshape(B, C, H * W)
    centres = _kmeans_plus_plus(f, num_proxies, generator)  # (B, M, C)
    previous = None
    for _ in range(iterations):
        assign = torch.cdist(f.transpose(1, 2), centres).argmin(2)  # (B, HW)
        if previous is not None and torch.equal(assign, previous):
            break
        previous = assign
        one_hot = torch.nn.functional.one_hot(assign, num_proxies).to(f.dtype)  # (B, HW, M)
        count = one_hot.sum(1)[:, :, None]
        mean = torch.bmm(one_hot.transpose(1, 2), f.transpose(1, 2)) / count.clamp(min=1)
        centres = torch.where(count > 0, mean, centres)  # an empty cluster keeps its centre
    return _nearest_distinct(f, centres)


def patch_grid(num_proxies, H, W):
    """(rows, cols) with rows*cols = M, rows <= H, cols <= W, closest to the image's aspect."""
    best = None
    for rows in range(1, num_proxies + 1):
        if num_proxies % rows or rows > H or num_proxies // rows > W:
            continue
        cols = num_proxies // rows
        err = abs(rows / cols - H / W)
        if best is None or err < best[0]:
            best = (err, rows, cols)
    if best is None:
        raise ValueError(
            f"num_proxies={num_proxies} cannot be laid out as a grid of patches on a "
            f"{H}x{W} map (strategy='patch' needs rows*cols = num_proxies, rows <= H, "
            f"cols <= W)"
        )
    return best[1], best[2]


def patch_proxies(feat, num_proxies):
    """One proxy per patch of a rows x cols grid (M = rows*cols, patch edges at floor(k*H/rows)):
    the pixel of the patch nearest to the patch's mean feature."""
    B, C, H, W = feat.shape
    rows, cols = patch_grid(num_proxies, H, W)
    ys = torch.arange(H, device=feat.device) * rows // H  # patch row of each pixel row
    xs = torch.arange(W, device=feat.device) * cols // W
    patch = (ys[:, None] * cols + xs[None, :]).reshape(-1)  # (HW,) patch id of each pixel
    member = torch.nn.functional.one_hot(patch, num_proxies).T.bool()  # (M, HW)
    f = feat.reshape(B, C, H * W)
    mean = torch.einsum("bcj,mj->bmc", f, member.to(f.dtype)) / member.sum(1)[None, :, None]
    return _nearest_distinct(f, mean, member[None].expand(B, -1, -1))
