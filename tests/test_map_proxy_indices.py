"""map_proxy_indices: the index formula (in int64 whatever the index dtype), and bad grids,
dtypes, ranges and grids whose indices int64 cannot hold."""

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


def formula(i, src_hw, dst_hw):
    """The mapping in Python ints (no wrap)."""
    W, W2 = src_hw[1], dst_hw[1]
    f = -(-W2 // W)
    return (i // W) * f * W2 + (i % W) * f


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize(
    "src_hw,dst_hw",
    [((5, 6), (4000, 4800)), ((11, 13), (70001, 65537)), ((3, 7), (2**31 + 5, 2**31 - 1)), ((1, 1), (1, 2**62))],
)
def test_map_proxy_indices_computes_in_int64_whatever_the_index_dtype(dtype, src_hw, dst_hw):
    hw = src_hw[0] * src_hw[1]
    top = min(hw, torch.iinfo(dtype).max + 1)
    idx = torch.cat([torch.arange(top), torch.randint(0, top, (7,))]).to(dtype).view(-1, 1)
    got = map_proxy_indices(idx, src_hw, dst_hw)
    assert got.dtype == torch.int64
    assert got.flatten().tolist() == [formula(i, src_hw, dst_hw) for i in idx.flatten().tolist()]


def test_map_proxy_indices_issue_29_int16_case():
    # the fuzzed case: int16 index 29 on (5, 6) -> (4000, 4800) wrapped to 28 576 in int16
    got = map_proxy_indices(torch.tensor([29], dtype=torch.int16), (5, 6), (4000, 4800))
    assert got.tolist() == [4 * 800 * 4800 + 5 * 800]


def test_map_proxy_indices_largest_grid_int64_holds():
    # H2·W2 = 2^63 - 1 = (7·7·73·127·337)·(92737·649657): its last pixel, 2^63 - 2, maps to itself
    H2, W2 = 7 * 7 * 73 * 127 * 337, 92737 * 649657
    assert H2 * W2 == 2**63 - 1
    idx = torch.tensor([0, 1, W2, 2**63 - 2])
    assert map_proxy_indices(idx, (H2, W2), (H2, W2)).tolist() == idx.tolist()
    coarse = torch.tensor([0, 1, 1999])  # (2, 1000) -> the same grid: f = ceil(W2 / 1000)
    got = map_proxy_indices(coarse, (2, 1000), (H2, W2)).tolist()
    assert got == [formula(i, (2, 1000), (H2, W2)) for i in (0, 1, 1999)]
    with pytest.raises(
        ValueError, match=r"dst_hw=\(4294967296, 2147483648\) has 9223372036854775808 pixels: .*overflow int64"
    ):
        map_proxy_indices(coarse, (2, 1000), (2**32, 2**31))
    with pytest.raises(ValueError, match="overflow int64"):
        map_proxy_indices(coarse, (2, 1000), (2**40, 2**40))
