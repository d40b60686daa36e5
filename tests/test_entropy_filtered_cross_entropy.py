"""entropy_filtered_cross_entropy (RA-BUSSeg's unsupervised loss): the most uncertain pixels
dropped, against the sorted entropies."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance

import busseg_ops


def test_entropy_filtered_cross_entropy_drops_most_uncertain():
    logits = torch.randn(2, 2, 4, 5)
    target = torch.randint(0, 2, (2, 4, 5))
    teacher = torch.randn(2, 2, 4, 5).mul(2).softmax(1)
    loss = busseg_ops.entropy_filtered_cross_entropy(logits, target, teacher, drop_percent=25)
    entropy = -(teacher * torch.log(teacher + 1e-10)).sum(1).flatten()
    kept = entropy.argsort()[:30]  # 40 pixels, the 10 most uncertain dropped
    ce = F.cross_entropy(logits, target, reduction="none").flatten()
    torch.testing.assert_close(loss, ce[kept].mean())
    with pytest.raises(ValueError, match="drop_percent"):
        busseg_ops.entropy_filtered_cross_entropy(logits, target, teacher, drop_percent=100)
    with pytest.raises(ValueError, match="target must be"):
        busseg_ops.entropy_filtered_cross_entropy(logits, target[:, :3], teacher)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_filtered_cross_entropy_half(dtype):
    # the entropies of the rounded probabilities in float32: the same pixels dropped as in float32
    logits = torch.randn(2, 2, 6, 7).to(dtype)
    target = torch.randint(0, 2, (2, 6, 7))
    teacher = torch.randn(2, 2, 6, 7).mul(2).softmax(1).to(dtype)
    loss = busseg_ops.entropy_filtered_cross_entropy(logits, target, teacher, drop_percent=25)
    expected = busseg_ops.entropy_filtered_cross_entropy(logits.float(), target, teacher.float(), drop_percent=25)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.float(), expected, **tolerance(dtype))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(drop_percent=float("nan")), ValueError, r"drop_percent must be in \[0, 100\), got nan"),
        (dict(drop_percent=float("-inf")), ValueError, r"drop_percent must be in \[0, 100\)"),
        (dict(drop_percent=True), TypeError, "drop_percent must be a real number, got bool"),
        (dict(drop_percent="20"), TypeError, "drop_percent must be a real number, got str"),
        (dict(ignore_index=255.0), TypeError, "ignore_index must be an int, got float"),
        (dict(ignore_index=True), TypeError, "ignore_index must be an int, got bool"),
    ],
)
def test_entropy_filtered_cross_entropy_bad_scalars(kwargs, error, match):
    logits, target = torch.randn(2, 2, 3, 4), torch.randint(0, 2, (2, 3, 4))
    with pytest.raises(error, match=match):
        busseg_ops.entropy_filtered_cross_entropy(logits, target, logits.softmax(1), **kwargs)
