"""gather_proxies: the gathered features, their gradient, and bad indices."""

import pytest
import torch

from busseg_ops import gather_proxies


def test_gather_proxies_keeps_gradients():
    feat = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 19, 7], [3, 3, 12]])
    p = gather_proxies(feat, idx)
    assert p.shape == (2, 3, 3)
    assert torch.equal(p[1, 2], feat[1, :, 2, 2]) and torch.equal(p[0, 1], feat[0, :, 3, 4])
    assert torch.autograd.gradcheck(lambda f: gather_proxies(f, idx), (feat,))
    with pytest.raises(ValueError, match=r"idx must hold pixel indices \(H\*W\) in \[0, 20\), got 29"):
        gather_proxies(feat, idx + 10)
    with pytest.raises(TypeError, match="idx must be int64"):
        gather_proxies(feat, idx.int())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_proxies_half(dtype):
    feat = torch.randn(2, 3, 4, 5).to(dtype).requires_grad_()
    idx = torch.tensor([[0, 19, 7], [3, 3, 12]])
    p = gather_proxies(feat, idx)
    assert p.dtype == dtype and torch.equal(p.float(), gather_proxies(feat.detach().float(), idx))
    (grad,) = torch.autograd.grad(p.sum(), feat)
    assert grad.dtype == dtype and grad.sum() == idx.numel() * 3  # one per gathered feature, repeats too


def test_gather_proxies_reads_no_index_off_the_cpu():
    """The range check reads the indices, which off the CPU is a host sync (no CUDA graph): there
    torch's gather guards them on the device instead. On meta tensors the call goes through."""
    feat, idx = torch.randn(2, 3, 4, 5, device="meta"), torch.full((2, 6), 99, device="meta")
    assert gather_proxies(feat, idx).shape == (2, 6, 3)
