"""ClassMemoryBank (PH-Net Eq. 14): FIFO order, wrap-around, empty class, checkpoint round trip and a
2-process torch.distributed (gloo) gather."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from busseg_ops import ClassMemoryBank


def rows(start, n, dim=3):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, dim).clone()


def test_fifo_oldest_goes_first_and_wraps_around():
    bank = ClassMemoryBank(2, 3, capacity=4)
    bank.push(rows(0, 3), torch.zeros(3, dtype=torch.long))
    assert bank.entries(0)[:, 0].tolist() == [0, 1, 2]
    bank.push(rows(3, 2), torch.zeros(2, dtype=torch.long))  # 0 is the oldest: it goes
    assert bank.entries(0)[:, 0].tolist() == [1, 2, 3, 4]
    bank.push(rows(5, 3), torch.zeros(3, dtype=torch.long))  # wraps: 1, 2, 3 go
    assert bank.entries(0)[:, 0].tolist() == [4, 5, 6, 7]
    bank.push(rows(10, 6), torch.zeros(6, dtype=torch.long))  # bigger than the buffer: newest 4
    assert bank.entries(0)[:, 0].tolist() == [12, 13, 14, 15]
    torch.testing.assert_close(bank.mean(0), torch.full((3,), 13.5))
    assert len(bank) == 4 and bank.entries(1).shape == (0, 3)


def test_classes_are_separate_and_empty_class_is_none():
    bank = ClassMemoryBank(3, 2, capacity=5)
    assert bank.mean(0) is None and len(bank) == 0
    labels = torch.tensor([0, 2, 0, 7, 2, 2])  # 7: outside [0, 3), dropped
    feats = torch.randn(6, 2, requires_grad=True)
    bank.push(feats, labels)
    assert not bank.features.requires_grad
    torch.testing.assert_close(bank.mean(0), feats[[0, 2]].mean(0).detach())
    torch.testing.assert_close(bank.mean(2), feats[[1, 4, 5]].mean(0).detach())
    assert bank.mean(1) is None and len(bank) == 5
    means = bank.means()
    assert means[1] is None and means[0] is not None
    with pytest.raises(ValueError, match="c must be < num_classes = 3"):
        bank.mean(3)
    with pytest.raises(ValueError, match=r"features must be \(n, 2\)"):
        bank.push(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_are_stored_in_the_bank_dtype(dtype):
    feats, labels = torch.randn(6, 2).to(dtype), torch.tensor([0, 1, 0, 1, 1, 0])
    bank, wide = ClassMemoryBank(2, 2, capacity=4), ClassMemoryBank(2, 2, capacity=4)
    bank.push(feats, labels)
    wide.push(feats.float(), labels)
    assert bank.features.dtype == torch.float32 and torch.equal(bank.features, wide.features)


def test_state_dict_round_trip():
    bank = ClassMemoryBank(2, 4, capacity=3)
    for i in range(5):
        bank.push(torch.randn(2, 4), torch.tensor([0, i % 2]))
    state = bank.state_dict()
    other = ClassMemoryBank(2, 4, capacity=3)
    other.load_state_dict(state)
    for c in range(2):
        torch.testing.assert_close(other.entries(c), bank.entries(c))
    bank.push(rows(100, 1, 4), torch.tensor([1]))
    other.push(rows(100, 1, 4), torch.tensor([1]))
    torch.testing.assert_close(other.entries(1), bank.entries(1))  # the write pointer came along
    with pytest.raises(ValueError, match="state_dict\\['features'\\] has shape"):
        ClassMemoryBank(2, 4, capacity=5).load_state_dict(state)


def _with(t, index, value):
    t[index] = value
    return t


@pytest.mark.parametrize(
    "key,value,error,match",
    [
        ("count", torch.tensor([4, 0]), ValueError, r"state_dict\['count'\] must hold values in \[0, 4\)"),
        ("count", torch.tensor([-1, 0]), ValueError, r"state_dict\['count'\] must hold values"),
        ("count", torch.tensor([1.0, 0.0]), TypeError, r"state_dict\['count'\] must be an integer tensor"),
        ("head", torch.tensor([3, 0]), ValueError, r"state_dict\['head'\] must hold values in \[0, 3\)"),
        ("head", torch.tensor([True, False]), TypeError, r"state_dict\['head'\] must be an integer tensor"),
        ("head", torch.tensor([0, 1]), ValueError, r"state_dict\['head'\] must equal state_dict\['count'\]"),
        ("features", torch.zeros(2, 3, 4, dtype=torch.int64), TypeError, "must be floating"),
        ("features", [[0.0]], TypeError, r"state_dict\['features'\] must be a tensor"),
        (
            "features",
            _with(torch.zeros(2, 3, 4), (1, 2, 0), float("nan")),
            ValueError,
            r"\['features'\] must be finite",
        ),
        ("features", _with(torch.zeros(2, 3, 4), (0, 0, 3), float("-inf")), ValueError, "must be finite"),
        (
            "features",
            _with(torch.zeros(2, 3, 4, dtype=torch.float64), (0, 1, 1), 1e300),
            ValueError,
            "finite in the bank's dtype torch.float32",
        ),
    ],
)
def test_load_state_dict_rejects_inconsistent_state(key, value, error, match):
    bank = ClassMemoryBank(2, 4, capacity=3)
    bank.push(torch.randn(2, 4), torch.tensor([0, 0]))  # class 0: 2 rows, head 2; class 1 empty
    state = bank.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    state[key] = value
    other = ClassMemoryBank(2, 4, capacity=3)
    other.push(torch.randn(1, 4), torch.tensor([1]))
    kept = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(error, match=match):
        other.load_state_dict(state)
    for k, v in other.state_dict().items():  # nothing was half loaded
        assert torch.equal(v, kept[k]), k
    bank.load_state_dict(before)


@pytest.mark.parametrize(
    "call,error,match",
    [
        # issue 29: a float label tensor was truncated (0.7 -> class 0), an int64 bank accepted
        (lambda b: b.push(torch.randn(2, 3), torch.tensor([0.7, 1.0])), TypeError, "labels must be an integer tensor"),
        (lambda b: b.push(torch.randn(2, 3), torch.tensor([True, False])), TypeError, "labels must be an integer"),
        (lambda b: b.push(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0])), ValueError, "must be finite"),
        (lambda b: b.push(torch.full((1, 3), 1e39, dtype=torch.float64), torch.tensor([1])), ValueError, "finite"),
        (lambda b: b.push(torch.randn(1, 3).long(), torch.tensor([1])), TypeError, "features must be one of"),
        (lambda b: ClassMemoryBank(2, 3, 4, dtype=torch.int64), TypeError, "dtype must be one of float32"),
        (lambda b: ClassMemoryBank(2, 3, 4, dtype=torch.bool), TypeError, "dtype must be one of"),
        (lambda b: ClassMemoryBank(2, 3, 4, dtype="float32"), TypeError, "dtype must be one of"),
        (lambda b: ClassMemoryBank(True, 3, 4), TypeError, "num_classes must be an int"),
        (lambda b: ClassMemoryBank(2, 3.0, 4), TypeError, "dim must be an int"),
        (lambda b: b.mean(True), TypeError, "c must be an int"),
    ],
)
def test_bad_labels_features_and_dtypes(call, error, match):
    bank = ClassMemoryBank(2, 3, capacity=4)
    bank.push(torch.randn(2, 3), torch.tensor([0, 1]))
    kept = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(error, match=match):
        call(bank)
    for k, v in bank.state_dict().items():  # a rejected push changes nothing
        assert torch.equal(v, kept[k]), k


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_integer_labels_of_any_width(dtype):
    feats, labels = torch.randn(5, 3), torch.tensor([1, 0, 1, 1, 0])
    bank, wide = ClassMemoryBank(2, 3, capacity=4), ClassMemoryBank(2, 3, capacity=4)
    bank.push(feats, labels.to(dtype))
    wide.push(feats, labels)
    assert all(torch.equal(bank.state_dict()[k], wide.state_dict()[k]) for k in ("features", "count", "head"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        bank = ClassMemoryBank(2, 3, capacity=6)
        for step, n in enumerate([(3, 1), (0, 4), (5, 2)]):  # different sizes per rank, one empty
            k = n[rank]
            feats = rows(1000 * rank + 10 * step, k)
            bank.push(feats, torch.arange(k) % 2)
        torch.save(bank.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_hold_the_same_bank(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # the same as one process pushing rank 0's rows then rank 1's, step by step
    expected = ClassMemoryBank(2, 3, capacity=6)
    for step, n in enumerate([(3, 1), (0, 4), (5, 2)]):
        for rank in range(2):
            k = n[rank]
            expected.push(rows(1000 * rank + 10 * step, k), torch.arange(k) % 2)
    for key, value in expected.state_dict().items():
        assert torch.equal(s0[key], value), key
    assert int(s0["count"].sum()) == 12
