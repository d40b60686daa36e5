import numpy as np
import pytest
import torch
from busseg_ops.train import augment, config, data, synthetic
from busseg_ops.train.errors import UserError
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
    assert config.partition_fraction("1/8") == 0.125 and config.normalise_partition(0.25) == "1/4"
    for bad in ("1/3", "2/3", "0", "abc", "1/0", 1.5):
        with pytest.raises(UserError, match="--partition"):
            config.normalise_partition(bad)
    # 1/4 from a labelled pool (BUSI protocol: a seeded subset of the 1/2 labelled list)
    lab, _ = data.partition(tr, 0.25, seed=0, labeled_pool=tr[:40])
    assert {i.name for i in lab} <= {i.name for i in tr[:40]}


def test_weak_augmentation_scales_the_original_and_pads_with_ignore():
    img = torch.rand(1, 30, 50)  # not square: the aspect must survive the scaling
    mask = torch.zeros(30, 50, dtype=torch.long)
    mask[10:20, 20:30] = 1
    outs = [augment.weak(img, mask, 32, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0].shape == (1, 32, 32) and outs[0][1].shape == (32, 32)
    # Scale 1, no flip, crop 64 of a 30×50 image: centred padding (17/17 rows, 7/7 columns), ignore 255.
    x, y = augment.weak(img, mask, 64, torch.Generator().manual_seed(0), scale=(1.0, 1.0), flip=False)
    assert torch.equal(y[17:47, 7:57], mask) and torch.equal(x[0, 17:47, 7:57], img[0])
    assert (y[:17] == augment.IGNORE).all() and (y[:, :7] == augment.IGNORE).all() and (x[0, :17] == 0).all()
    # Upstream's factor: half the draws in [0.5, 1], half in [1, 2]; int(H·s) × int(W·s) keeps the aspect.
    sizes = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        below, u, _ = torch.rand(3, generator=g).tolist()
        s = 0.5 + 0.5 * u if below < 0.5 else 1 + u
        sizes.append((int(30 * s), int(50 * s)))
        _, y = augment.weak(img, mask, 128, torch.Generator().manual_seed(seed), flip=False)
        assert int((y != augment.IGNORE).sum()) == sizes[-1][0] * sizes[-1][1]
    assert min(h for h, _ in sizes) < 30 < max(h for h, _ in sizes)
    box = augment.cutmix_box(3, 16, 16, p=1.0)
    a = torch.arange(3.0)[:, None, None].expand(3, 16, 16)
    (mixed,) = augment.mix(box, a)
    assert torch.equal(mixed[0][box[0]], torch.ones(int(box[0].sum())))  # pasted from image 1


def test_16bit_images_are_scaled_by_the_bit_depth_not_their_maximum(tmp_path):
    a = np.array([[0, 257, 1000], [25700, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")  # a dim 16-bit image: its maximum is 65535 here,
    Image.fromarray(a // 4).save(tmp_path / "dim.png")  # but not here (max 16383)
    assert np.array_equal(data.read_gray(str(tmp_path / "x.png")), np.rint(a / 257).astype(np.uint8))
    assert data.read_gray(str(tmp_path / "dim.png")).max() == round(16383 / 257)  # stays dim, not stretched


def test_every_file_is_checked_before_training_and_all_problems_are_listed(busi):
    root = busi[0]
    sp = data.Splits(data.busi_items(str(root)), [], [], [])
    data.check_items(sp, progress=False)  # a clean set passes
    (root / "benign" / "benign (1).png").write_bytes(b"not a png")
    with pytest.raises(data.DataError) as one:
        data.check_items(sp, progress=False)
    assert len(str(one.value).splitlines()) == 1 and "benign (1).png" in str(one.value)
    (root / "malignant" / "malignant (1)_mask.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(data.DataError) as two:
        data.check_items(sp, progress=False)
    lines = str(two.value).splitlines()
    assert (
        lines[0].startswith("2 of 2 data files") and "benign (1).png" in lines[1] and "malignant (1)_mask" in lines[2]
    )


def test_upstream_image_label_layout(tmp_path):
    for d in ("image", "label"):
        (tmp_path / d).mkdir()
    for name in ("benign (1).png", "malignant (2).png"):
        _png(tmp_path / "image" / name, np.full((8, 8), 90, np.uint8))
        _png(tmp_path / "label" / name, np.eye(8, dtype=np.uint8) * 255)
    items = data.busi_items(str(tmp_path))
    assert [(it.name, it.cls) for it in items] == [("benign (1).png", 0), ("malignant (2).png", 1)]
    assert data.load_item(items[1])[1].sum() == 8
