"""greedy_proxy_sampling (RA-BUSSeg; docs/ops.md) in plain PyTorch: the executable form of the
contract. It keeps the two running arrays (cumulative similarity and its running max) for the
whole batch and computes one similarity row per step (never the (B, HW, HW) map)."""

import torch


def first_proxy_index(label, batch, hw, generator, device):
    """First proxy per image: a uniform foreground pixel of ``label`` (B, H, W) where it has one,
    else a uniform pixel. One uniform draw per image from ``generator``. (B,) int64."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    uniform = (u * hw).long().clamp_(max=hw - 1)
    if label is None:
        return uniform
    fg = label.reshape(batch, hw) > 0
    count = fg.sum(1)
    k = (u * count).long().clamp_(max=(count - 1).clamp(min=0))
    kth_fg = (fg.cumsum(1) > k[:, None]).long().argmax(1)  # first pixel with k+1 foreground up to it
    return torch.where(count > 0, kth_fg, uniform)


def _next_proxy(score, chosen):
    """Smallest score among unchosen pixels (NaN counts as +inf), ties to the smallest index."""
    key = torch.where(score.isnan(), float("inf"), score)
    best = torch.where(chosen, float("inf"), key).amin(1, keepdim=True)
    return (~chosen & (key == best)).long().argmax(1)  # argmax of a 0/1 row: its first 1


def greedy_proxy_sampling(feat, first, num_proxies, scale):
    """(B, M) int64 proxies, starting from ``first`` (B,); the signature of
    ``busseg::greedy_proxy_sampling``."""
    B, C, H, W = feat.shape
    acc = torch.float64 if feat.dtype == torch.float64 else torch.float32
    f = feat.reshape(B, C, H * W).to(acc)
    batch = torch.arange(B, device=feat.device)
    cumulative = torch.zeros(B, H * W, dtype=acc, device=feat.device)  # c_t(j)
    score = torch.full_like(cumulative, float("-inf"))  # max over t of c_t(j)
    chosen = torch.zeros(B, H * W, dtype=torch.bool, device=feat.device)
    idx = torch.empty(B, num_proxies, dtype=torch.long, device=feat.device)
    s = first.to(device=feat.device, dtype=torch.long)
    for m in range(num_proxies):
        idx[:, m] = s
        chosen[batch, s] = True
        if m + 1 < num_proxies:
            cumulative += scale * torch.einsum("bc,bcj->bj", f[batch, :, s], f)  # row S(s_m, ·)
            score = torch.maximum(score, cumulative)
            s = _next_proxy(score, chosen)
    return idx
