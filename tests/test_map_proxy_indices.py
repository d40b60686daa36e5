"""map_proxy_indices: the index formula, and bad grids, dtypes and ranges."""

import pytest
import torch

from busseg_ops import map_proxy_indices


def test_map_proxy_indices_formula():
    idx = torch.tensor([[0, 1, 64, 65, 4224], [130, 7, 8, 9, 10]])
    got = map_proxy_indices(idx, (65, 65), (130, 130))
    expected = [[(i // 65) * 2 * 130 + (i % 65) * 2 for i in row] for row in idx.tolist()]
    assert got.tolist() == expected and got.dtype == torch.int64
    assert map_proxy_indices(torch.tensor([[5, 13]]), (3, 5), (5, 9)).tolist() == [[18, 42]]
    with pytest.raises(ValueError, match="dst_hw=.* is too small"):
        map_proxy_indices(idx, (65, 65), (64, 130))
    with pytest.raises(ValueError, match="src_hw must be a pair of positive ints"):
        map_proxy_indices(idx, (65, 0), (130, 130))


@pytest.mark.parametrize(
    "idx,error,match",
    [
        (torch.tensor([[0.0, 1.0]]), TypeError, "idx must be an integer tensor"),
        (torch.tensor([[0, 9]]), ValueError, r"idx must hold pixel indices of the 3x3 grid in \[0, 9\)"),
        (torch.tensor([[-1, 0]]), ValueError, "idx must hold pixel indices"),
        (torch.tensor([[True, False]]), TypeError, "idx must be an integer tensor"),
    ],
)
def test_map_proxy_indices_bad_indices(idx, error, match):
    with pytest.raises(error, match=match):
        map_proxy_indices(idx, (3, 3), (6, 6))
