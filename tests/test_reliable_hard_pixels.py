"""reliable_hard_pixels (PH-Net Eq. 10-13) at the feature grid."""

import pytest
import torch

import busseg_ops


def test_reliable_hard_pixels_eq10_13():
    B, H, W = 2, 16, 16
    pseudo = torch.randint(0, 2, (B, H, W))
    argmax = torch.where(torch.rand(B, H, W) < 0.7, pseudo, 1 - pseudo)
    hard = torch.rand(B, 4, 4)
    out = busseg_ops.reliable_hard_pixels(pseudo, argmax, hard, 3, (8, 8))
    assert isinstance(out, busseg_ops.ReliableHardPixels)
    assert out.mask.shape == (B, 8, 8) and out.labels.dtype == torch.int64
    lab = pseudo[:, ::2, ::2]
    torch.testing.assert_close(out.labels, lab)
    top = torch.zeros(B, 16, dtype=torch.bool).scatter_(1, hard.flatten(1).topk(3, 1).indices, True)
    top = top.view(B, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(out.hard, top)
    assert torch.equal(out.mask, top & (lab == argmax[:, ::2, ::2]))
    with pytest.raises(ValueError, match="k must be <= the number of patches 16"):
        busseg_ops.reliable_hard_pixels(pseudo, argmax, hard, 17, (8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reliable_hard_pixels_half_hardness(dtype):
    pseudo = torch.randint(0, 2, (2, 16, 16))
    argmax = torch.where(torch.rand(2, 16, 16) < 0.7, pseudo, 1 - pseudo)
    hard = torch.stack([torch.randperm(16), torch.randperm(16)]).view(2, 4, 4) / 16  # exact, distinct in both
    got = busseg_ops.reliable_hard_pixels(pseudo, argmax, hard.to(dtype), 5, (8, 8))
    expected = busseg_ops.reliable_hard_pixels(pseudo, argmax, hard, 5, (8, 8))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize(
    "change,error,match",
    [
        # issue 29: float label maps were truncated (0.6 -> 0)
        (
            dict(pseudo=lambda p: p.float() * 0.6),
            TypeError,
            "pseudo_label must be an integer tensor, got torch.float32",
        ),
        (dict(argmax=lambda a: a.double()), TypeError, "teacher_argmax must be an integer tensor"),
        (dict(argmax=lambda a: a.bool()), TypeError, "teacher_argmax must be an integer tensor"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(feat_hw=(8, True)), TypeError, "feat_hw must be an int"),
        (dict(hard=lambda h: h.long()), TypeError, "hardness must be one of"),
    ],
)
def test_reliable_hard_pixels_bad_inputs(change, error, match):
    pseudo = torch.randint(0, 2, (2, 16, 16))
    args = dict(pseudo=pseudo, argmax=pseudo.clone(), hard=torch.rand(2, 4, 4), k=3, feat_hw=(8, 8))
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(error, match=match):
        busseg_ops.reliable_hard_pixels(args["pseudo"], args["argmax"], args["hard"], args["k"], args["feat_hw"])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_reliable_hard_pixels_integer_labels_of_any_width(dtype):
    pseudo = torch.randint(0, 2, (2, 16, 16))
    argmax = torch.where(torch.rand(2, 16, 16) < 0.7, pseudo, 1 - pseudo)
    hard = torch.rand(2, 4, 4)
    got = busseg_ops.reliable_hard_pixels(pseudo.to(dtype), argmax.to(dtype), hard, 5, (8, 8))
    expected = busseg_ops.reliable_hard_pixels(pseudo, argmax, hard, 5, (8, 8))
    assert all(torch.equal(g, e) for g, e in zip(got, expected)) and got.labels.dtype == torch.int64
