"""The published layouts of MALUNet (JCruan519/MALUNet, models/malunet.py) and UNeXt
(jeya-maria-jose/UNeXt-pytorch, archs.py ``UNext``) at their public default configs (3 input
channels, 1 class), written out from the public modules' structure: every state-dict key in the
public registration order, with its shape. And a deterministic state dict for any layout, the one
tests/data/published_malunet_unext.pt was computed with by the public code."""

import torch


def _gn(p, c):
    return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,))]


def _conv(p, cin, cout, k=3, groups=1, bias=True):
    return [(f"{p}.weight", (cout, cin // groups, k, k))] + ([(f"{p}.bias", (cout,))] if bias else [])


def _dw(p, cin, cout, k):  # DepthWiseConv2d: conv1 (depthwise), norm_layer, conv2 (1×1)
    return (
        _conv(f"{p}.conv1", cin, cin, k, groups=cin) + _gn(f"{p}.norm_layer", cin) + _conv(f"{p}.conv2", cin, cout, 1)
    )


def _dga(p, cin, cout):  # DilatedGatedAttention: mda0..3, norm_layer, conv, gau
    q = cin // 4
    keys = [k for i in range(4) for k in _conv(f"{p}.mda{i}", q, q, 3, groups=q)]
    keys += _gn(f"{p}.norm_layer", cin) + _conv(f"{p}.conv", cin, cin, 1)
    g = f"{p}.gau"
    return (
        keys
        + _dw(f"{g}.w1.0", cin, cin, 3)
        + _dw(f"{g}.w2.0", cin, cin, 5)
        + _dw(f"{g}.wo.0", cin, cout, 3)
        + (_conv(f"{g}.cw", cin, cout, 1))
    )


def _ea(p, c):  # EAblock: conv1, linear_0, linear_1, conv2, norm_layer
    return (
        _conv(f"{p}.conv1", c, c, 1)
        + [(f"{p}.linear_0.weight", (4 * c, c, 1)), (f"{p}.linear_1.weight", (c, 4 * c, 1))]
        + _conv(f"{p}.conv2", c, c, 1, bias=False)
        + _gn(f"{p}.norm_layer", c)
    )


def malunet_layout(c=(8, 16, 24, 32, 48, 64), cin=3, classes=1):
    keys = _conv("encoder1.0", cin, c[0]) + _conv("encoder2.0", c[0], c[1]) + _conv("encoder3.0", c[1], c[2])
    for i, (a, b) in enumerate([(c[2], c[3]), (c[3], c[4]), (c[4], c[5])], 4):
        keys += _ea(f"encoder{i}.0", a) + _dga(f"encoder{i}.1", a, b)
    total = sum(c[:5])
    keys += [("scab.catt.get_all_att.weight", (1, 1, 3))]
    for i in range(5):
        keys += [(f"scab.catt.att{i + 1}.weight", (c[i], total)), (f"scab.catt.att{i + 1}.bias", (c[i],))]
    keys += [("scab.satt.shared_conv2d.0.weight", (1, 2, 7, 7)), ("scab.satt.shared_conv2d.0.bias", (1,))]
    for i, (a, b) in enumerate([(c[5], c[4]), (c[4], c[3]), (c[3], c[2])], 1):
        keys += _dga(f"decoder{i}.0", a, b) + _ea(f"decoder{i}.1", b)
    keys += _conv("decoder4.0", c[2], c[1]) + _conv("decoder5.0", c[1], c[0])
    for i in range(5):
        keys += _gn(f"ebn{i + 1}", c[i])
    for i in range(5):
        keys += _gn(f"dbn{i + 1}", c[4 - i])
    return keys + _conv("final", c[0], classes, 1)


def _bn(p, c):
    return _gn(p, c) + [(f"{p}.running_mean", (c,)), (f"{p}.running_var", (c,)), (f"{p}.num_batches_tracked", ())]


def _ln(p, c):
    return _gn(p, c)


def _shifted_block(p, d):  # shiftedBlock: norm2, mlp (fc1, dwconv.dwconv, fc2)
    return (
        _ln(f"{p}.norm2", d)
        + [(f"{p}.mlp.fc1.weight", (d, d)), (f"{p}.mlp.fc1.bias", (d,))]
        + _conv(f"{p}.mlp.dwconv.dwconv", d, d, 3, groups=d)
        + [(f"{p}.mlp.fc2.weight", (d, d)), (f"{p}.mlp.fc2.bias", (d,))]
    )


def unext_layout(cin=3, classes=1):
    keys = _conv("encoder1", cin, 16) + _conv("encoder2", 16, 32) + _conv("encoder3", 32, 128)
    keys += _bn("ebn1", 16) + _bn("ebn2", 32) + _bn("ebn3", 128)
    keys += _ln("norm3", 160) + _ln("norm4", 256) + _ln("dnorm3", 160) + _ln("dnorm4", 128)
    keys += _shifted_block("block1.0", 160) + _shifted_block("block2.0", 256)
    keys += _shifted_block("dblock1.0", 160) + _shifted_block("dblock2.0", 128)
    for name, a, b in (("patch_embed3", 128, 160), ("patch_embed4", 160, 256)):
        keys += [(f"{name}.proj.weight", (b, a, 3, 3)), (f"{name}.proj.bias", (b,))] + _ln(f"{name}.norm", b)
    for i, (a, b) in enumerate([(256, 160), (160, 128), (128, 32), (32, 16), (16, 16)], 1):
        keys += _conv(f"decoder{i}", a, b)
    for i, ch in enumerate((160, 128, 32, 16), 1):
        keys += _bn(f"dbn{i}", ch)
    return keys + _conv("final", 16, classes, 1)


def deterministic_state(state: dict, seed: int = 0) -> dict:
    """Every tensor of `state` (its keys and shapes, in order) refilled from one seeded generator:
    weights N(0, 0.1²) + 1 for norm scales, BN running variances in [0.5, 1.5), counters 0. MALUNet's
    EAblock linear_0 is then set to linear_1ᵀ: in the public code the two share one storage, so
    loading a state dict there leaves linear_1's values in both."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros_like(v)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.1
            if k.endswith(".weight") and v.dim() == 1:  # GroupNorm / BatchNorm / LayerNorm scales
                out[k] += 1.0
    for k in out:
        if k.endswith("linear_1.weight"):
            out[k.replace("linear_1", "linear_0")] = out[k].permute(1, 0, 2).clone()
    return out
