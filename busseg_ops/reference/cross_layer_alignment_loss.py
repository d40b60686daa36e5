"""cross_layer_alignment_loss (RA-BUSSeg CRA; docs/ops.md) in plain PyTorch, written the upstream
way: softmax per layer, then ``KLDivLoss(log(P_l + eps), P_{l+1})`` per adjacent pair."""

import torch


def cross_layer_alignment_loss(feats, proxies, reduction, eps):
    """P_l = softmax over the proxies of the pixel-to-proxy logits <feats_l[:, p], proxies_l[m]>,
    then KLDivLoss(log(P_l + eps), P_{l+1}) averaged over the L-1 adjacent pairs. ``feats[l]``
    (B, C_l, H, W), ``proxies[l]`` (B, M, C_l). float16 / bfloat16 inputs are computed in float32
    (in float16 eps = 1e-10 is 0, and a probability that underflows makes the loss inf)."""
    dtype = feats[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        feats, proxies = [f.float() for f in feats], [p.float() for p in proxies]
    kl = torch.nn.KLDivLoss(reduction=reduction)
    probs = [torch.einsum("bchw,bmc->bhwm", f, p).softmax(-1) for f, p in zip(feats, proxies)]
    pairs = [kl(torch.log(probs[l] + eps), probs[l + 1]) for l in range(len(probs) - 1)]
    return (sum(pairs) / len(pairs)).to(dtype)
