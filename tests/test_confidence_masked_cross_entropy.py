"""confidence_masked_cross_entropy (PH-Net Eq. 8-9): a plain PyTorch composition, against the
per-pixel sum written out."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance

import busseg_ops


def test_confidence_masked_cross_entropy_eq8_9():
    logits = torch.randn(2, 2, 5, 6, requires_grad=True)
    target = torch.randint(0, 2, (2, 5, 6))
    target[0, 0, 0] = 255
    teacher = torch.randn(2, 2, 5, 6).mul(3).softmax(1)
    loss = busseg_ops.confidence_masked_cross_entropy(logits, target, teacher, threshold=0.9)
    keep = (teacher.max(1).values >= 0.9) & (target != 255)
    manual = (
        sum(F.cross_entropy(logits[b : b + 1, :, i, j], target[b : b + 1, i, j]) for b, i, j in keep.nonzero().tolist())
        / (target != 255).sum()
    )
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert logits.grad[~keep[:, None].expand_as(logits)].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_confidence_masked_cross_entropy_half(dtype):
    logits = torch.randn(2, 2, 5, 6).to(dtype)
    target = torch.randint(0, 2, (2, 5, 6))
    teacher = torch.randn(2, 2, 5, 6).mul(3).softmax(1).to(dtype)
    loss = busseg_ops.confidence_masked_cross_entropy(logits, target, teacher)
    expected = busseg_ops.confidence_masked_cross_entropy(logits.float(), target, teacher.float())
    assert loss.dtype == dtype and (teacher.amax(1) >= 0.9).any()  # the threshold keeps some pixels
    torch.testing.assert_close(loss.float(), expected, **tolerance(dtype))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(threshold=float("nan")), ValueError, r"threshold must be in \[0, 1\], got nan"),
        (dict(threshold=float("inf")), ValueError, r"threshold must be in \[0, 1\], got inf"),
        (dict(threshold=2), ValueError, r"threshold must be in \[0, 1\], got 2"),
        (dict(threshold=-0.1), ValueError, r"threshold must be in \[0, 1\]"),
        (dict(threshold=True), TypeError, "threshold must be a real number, got bool"),
        (dict(threshold=torch.tensor(0.9)), TypeError, "threshold must be a real number, got Tensor"),
        (dict(ignore_index=255.0), TypeError, "ignore_index must be an int, got float"),
        (dict(ignore_index=False), TypeError, "ignore_index must be an int, got bool"),
    ],
)
def test_confidence_masked_cross_entropy_bad_scalars(kwargs, error, match):
    # issue 29: NaN, inf or 2 kept no pixel and gave a loss of 0
    logits, target = torch.randn(2, 2, 3, 4), torch.randint(0, 2, (2, 3, 4))
    with pytest.raises(error, match=match):
        busseg_ops.confidence_masked_cross_entropy(logits, target, logits.softmax(1), **kwargs)


def test_confidence_masked_cross_entropy_threshold_bounds_are_inclusive():
    logits, target = torch.randn(2, 2, 3, 4), torch.randint(0, 2, (2, 3, 4))
    teacher = logits.softmax(1)
    everything = F.cross_entropy(logits, target)
    torch.testing.assert_close(busseg_ops.confidence_masked_cross_entropy(logits, target, teacher, 0), everything)
    torch.testing.assert_close(busseg_ops.confidence_masked_cross_entropy(logits, target, teacher, 0.0), everything)
    one_hot = F.one_hot(target, 2).permute(0, 3, 1, 2).float()  # max probability exactly 1
    torch.testing.assert_close(busseg_ops.confidence_masked_cross_entropy(logits, target, one_hot, 1), everything)
