import numpy as np
import pytest
import torch
from busseg_ops.train import augment, data, synthetic
from PIL import Image


def test_synthetic_is_deterministic_and_hypoechoic():
    a, ma, ca = synthetic.make_image(7, 96)
    b, mb, cb = synthetic.make_image(7, 96)
    c, _, _ = synthetic.make_image(8, 96)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and ca == cb
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (96, 96) and set(np.unique(ma)) == {0, 1}
    for s in range(10):  # the lesion is darker than the tissue around it
        img, m, _ = synthetic.make_image(s, 96)
        assert img[m == 1].mean() < img[m == 0].mean()


def _png(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture
def busi(tmp_path):
    root = tmp_path / "BUSI"
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
    g = np.random.RandomState(0)
    img = g.randint(0, 255, (20, 30), dtype=np.uint8)
    _png(root / "benign" / "benign (1).png", img)  # 8-bit grayscale
    _png(root / "malignant" / "malignant (1).png", np.repeat(img[..., None], 3, 2))  # RGB-encoded
    m0 = np.zeros((20, 30), np.uint8)
    m0[2:5, 2:5] = 255
    m1 = np.zeros((20, 30), np.uint8)
    m1[10:12, 20:25] = 255
    _png(root / "benign" / "benign (1)_mask.png", m0)
    _png(root / "benign" / "benign (1)_mask_1.png", m1)
    _png(root / "malignant" / "malignant (1)_mask.png", np.repeat(m1[..., None], 3, 2))
    return root, img, m0, m1


def test_busi_loader_grayscale_rgb_and_merged_masks(busi):
    root, img, m0, m1 = busi
    items = data.busi_items(str(root))
    assert [it.name for it in items] == ["benign (1).png", "malignant (1).png"]
    assert [it.cls for it in items] == [0, 1]
    g, mg = data.load_item(items[0])
    r, mr = data.load_item(items[1])
    assert np.array_equal(g, img) and np.array_equal(r, img)  # RGB-encoded gray reads back the same
    assert np.array_equal(mg, ((m0 > 0) | (m1 > 0)).astype(np.uint8))  # _mask ∪ _mask_1
    assert np.array_equal(mr, (m1 > 0).astype(np.uint8))


def test_corrupt_or_missing_files_are_named(busi, tmp_path):
    root = busi[0]
    bad = root / "benign" / "benign (1).png"
    bad.write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=r"benign \(1\)\.png"):
        data.load_item(data.busi_items(str(root))[0])
    (root / "malignant" / "malignant (1)_mask.png").unlink()
    with pytest.raises(data.DataError, match=r"malignant \(1\)\.png"):
        data.busi_items(str(root))
    with pytest.raises(data.DataError, match="nowhere.png"):
        data.read_gray(str(tmp_path / "nowhere.png"))


def test_folder_and_udiat_layouts(tmp_path):
    for d in ("original", "GT"):
        (tmp_path / d).mkdir()
    for i in range(3):
        _png(tmp_path / "original" / f"{i:06d}.png", np.full((8, 8), 100, np.uint8))
        _png(tmp_path / "GT" / f"{i:06d}.png", np.eye(8, dtype=np.uint8) * 255)
    items = data.udiat_items(str(tmp_path))
    assert len(items) == 3 and data.load_item(items[0])[1].sum() == 8
    (tmp_path / "GT" / "000002.png").unlink()
    with pytest.raises(data.DataError, match="000002.png"):
        data.udiat_items(str(tmp_path))


def test_partitions_and_811_split():
    items = data.synthetic_items(100, seed=3)
    tr, va, te = data.split_811(items, seed=0)
    assert (len(tr), len(va), len(te)) == (80, 10, 10)
    assert not {i.name for i in tr} & {i.name for i in te}
    for frac, k in ((0.5, 40), (0.25, 20), (0.125, 10)):
        lab, unl = data.partition(tr, frac, seed=1)
        assert len(lab) == k and len(lab) + len(unl) == 80
        assert not {i.name for i in lab} & {i.name for i in unl}
        assert [i.name for i in lab] == [i.name for i in data.partition(tr, frac, seed=1)[0]]
    assert data.parse_fraction("1/8") == 0.125
    # 1/4 from a labelled pool (BUSI protocol: a seeded subset of the 1/2 labelled list)
    lab, _ = data.partition(tr, 0.25, seed=0, labeled_pool=tr[:40])
    assert {i.name for i in lab} <= {i.name for i in tr[:40]}


def test_weak_augmentation_pads_with_ignore_and_is_seeded():
    img = torch.rand(1, 40, 40)
    mask = torch.ones(40, 40, dtype=torch.long)
    outs = [augment.weak(img, mask, 32, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0].shape == (1, 32, 32) and outs[0][1].shape == (32, 32)
    small = augment.weak(img, mask, 32, torch.Generator().manual_seed(0), scale=(0.5, 0.5))
    assert (small[1] == augment.IGNORE).any() and (small[1] == 1).any()
    box = augment.cutmix_box(3, 16, 16, p=1.0)
    a = torch.arange(3.0)[:, None, None].expand(3, 16, 16)
    (mixed,) = augment.mix(box, a)
    assert torch.equal(mixed[0][box[0]], torch.ones(int(box[0].sum())))  # pasted from image 1
