import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import fake_busi, write_lists

from busseg_ops.train import augment, config, data, synthetic
from busseg_ops.train.errors import UserError


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


# ----------------------------------------------------------------------------------------------
# Masks: binary or an error naming the values found; 12-bit data in 16 bits is reported


def _mask_file(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_masks_0_1_in_8_or_16_bits_and_0_255_or_65535_read_as_the_same_lesion(tmp_path):
    lesion = np.zeros((9, 11), bool)
    lesion[2:6, 3:8] = True
    for name, array in {
        "u8_255.png": lesion.astype(np.uint8) * 255,
        "u8_01.png": lesion.astype(np.uint8),
        "u16_01.png": lesion.astype(np.uint16),  # was read as empty: 1/257 rounds to 0
        "u16_65535.png": lesion.astype(np.uint16) * 65535,
        "rgb.png": np.repeat(lesion.astype(np.uint8)[..., None] * 255, 3, 2),
        "rgba_opaque.png": np.dstack(
            [np.repeat(lesion.astype(np.uint8)[..., None] * 255, 3, 2), np.full((9, 11), 255, np.uint8)]
        ),
        "empty.png": np.zeros((9, 11), np.uint8),  # BUSI's normal images
    }.items():
        path = _mask_file(tmp_path / name, array)
        want = np.zeros_like(lesion) if name == "empty.png" else lesion
        assert np.array_equal(data.read_mask(path), want.astype(np.uint8)), name


@pytest.mark.parametrize(
    "name,array,message",
    [
        ("labels.png", np.array([[0, 1, 2], [2, 1, 0]], np.uint8), r"values 0, 1, 2; expected a binary mask"),
        ("two_sixteen.png", np.array([[0, 1000], [4095, 0]], np.uint16), r"values 0, 1000, 4095"),
        ("jpeg_like.png", np.array([[0, 3, 250], [255, 255, 0]], np.uint8), r"values 0, 3, 250, 255"),
        (
            "alpha.png",  # the lesion drawn in the alpha channel, the colour all black
            np.dstack([np.zeros((2, 3, 3), np.uint8), np.array([[0, 255, 255], [0, 0, 255]], np.uint8)]),
            r"RGBA with a transparent part \(alpha values 0, 255\)",
        ),
        ("colour.png", np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8), "a colour mask"),
    ],
)
def test_masks_that_are_not_binary_are_errors_naming_the_values(tmp_path, name, array, message):
    path = _mask_file(tmp_path / name, array)
    with pytest.raises(data.DataError, match=message) as err:
        data.read_mask(path)
    assert name in str(err.value) and len(str(err.value).splitlines()) == 1


def test_12_bit_data_in_16_bits_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_warned_low_bits", False)
    twelve = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 200).clip(0, 4095)
    Image.fromarray(twelve).save(tmp_path / "a.png")
    Image.fromarray(twelve).save(tmp_path / "b.png")
    with pytest.warns(data.DataWarning, match=r"a\.png: a 16-bit image whose values stay below 4096"):
        img = data.read_gray(str(tmp_path / "a.png"))
    assert img.max() == round(3800 / 257)  # read as documented (65535 → 255), and said so
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.read_gray(str(tmp_path / "b.png"))  # once per process, not once per image


# ----------------------------------------------------------------------------------------------
# Split lists: checked up front; a missing folder or list is an error, never a random split


@pytest.fixture
def busi_lists(tmp_path):
    root = tmp_path / "BUSI"
    split = fake_busi(str(root), per_class=12)
    return root, split


def _write(path, lines):
    path.write_text("".join(f"{n}\n" for n in lines))


def test_the_authors_lists_are_used_with_their_sizes_and_a_banner(busi_lists):
    root, split = busi_lists
    sp = data.make_splits("busi", str(root), "1/2", seed=0)
    assert [it.name for it in sp.test] == split["test"] and [it.name for it in sp.labeled] == split["labeled"]
    assert [it.name for it in sp.unlabeled] == split["unlabeled"] and sp.val == sp.test
    banner = sp.banner()
    assert f"split lists in {root / 'splits'} (test.txt, 1_2/labeled.txt, 1_2/unlabeled.txt)" in banner
    assert banner.endswith("10 labelled, 10 unlabelled, 4 validation (the test list), 4 test")
    described = sp.describe()
    assert described["sizes"] == {"labeled": 10, "unlabeled": 10, "val": 4, "test": 4}
    assert described["images"]["test"] == split["test"] and described["split"] == "lists"
    # 1/4 from the 1/2 lists: a seeded half of the labelled list, the rest unlabelled
    quarter = data.make_splits("busi", str(root), "1/4", seed=3)
    assert {it.name for it in quarter.labeled} < set(split["labeled"]) and len(quarter.labeled) == 5
    assert len(quarter.unlabeled) == 15 and "labelled drawn with the seed from 1_2/labeled.txt" in quarter.banner()
    # the lists of 1_4/ when the folder has them (not a draw from 1_2)
    own = root / "splits" / "1_4"
    own.mkdir()
    _write(own / "labeled.txt", split["labeled"][:3])
    _write(own / "unlabeled.txt", split["labeled"][3:] + split["unlabeled"])
    quarter = data.make_splits("busi", str(root), "1/4", seed=3)
    assert [it.name for it in quarter.labeled] == split["labeled"][:3] and "the lists of 1_4" in quarter.banner()


def test_a_missing_folder_or_list_is_an_error_not_a_random_split(busi_lists, tmp_path):
    root, split = busi_lists
    with pytest.raises(UserError, match=r"--split-dir .*nowhere: no such folder"):
        data.make_splits("busi", str(root), "1/2", split_dir=str(tmp_path / "nowhere"))
    for name in ("test.txt", "1_2/unlabeled.txt"):
        path = root / "splits" / name
        text = path.read_text()
        path.unlink()
        with pytest.raises(data.DataError, match=f"split list missing: .*{name}"):
            data.make_splits("busi", str(root), "1/2")
        path.write_text(text)
    (root / "splits" / "test.txt").rename(root / "test.txt")
    (root / "splits").rename(root / "lists")
    with pytest.raises(data.DataError, match=r"--data busi: no split lists at .*splits .* --split-mode random"):
        data.make_splits("busi", str(root), "1/2")
    sp = data.make_splits("busi", str(root), "1/2", split="random")  # asked for: the seeded 8:1:1 split
    assert sp.source["split"] == "random" and "random 8:1:1 split" in sp.banner()
    assert len(sp.test) == round(24 / 10)
    with pytest.raises(UserError, match="--split-dir: synthetic data has no split lists"):
        config.TrainConfig(split_dir="lists").validate()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: {**s, "labeled": []}, r"split list .*1_2/labeled.txt is empty"),  # hung the trainer
        (lambda s: {**s, "test": []}, r"split list .*test.txt is empty"),  # wrote NaN metrics
        (
            lambda s: {**s, "labeled": s["labeled"] + s["test"][:1]},
            r"in both test.txt and 1_2/labeled.txt \(a train/test leak\)",
        ),
        (
            lambda s: {**s, "unlabeled": s["unlabeled"] + s["labeled"][:2]},
            r"2 image\(s\) in both 1_2/labeled.txt and 1_2/unlabeled.txt \(one image in two roles\)",
        ),
        (
            lambda s: {**s, "test": s["test"] + s["test"][:1]},
            r"test.txt: 'benign \(1\).png' is listed twice \(lines 1 and 5\)",
        ),
        (
            lambda s: {**s, "test": s["test"] + ["benign (99).png"]},
            r"test.txt: 1 listed names not found in the data, e.g. 'benign \(99\).png'",
        ),
    ],
)
def test_split_lists_are_checked_before_use(busi_lists, edit, message):
    root, split = busi_lists
    write_lists(str(root / "splits"), edit(split))
    with pytest.raises(UserError, match=message) as err:
        data.make_splits("busi", str(root), "1/2")
    assert len(str(err.value).splitlines()) == 1


def test_limit_keeps_every_lists_role(busi_lists):
    root, split = busi_lists
    sp = data.make_splits("busi", str(root), "1/2", seed=1, limit=12)
    assert (len(sp.test), len(sp.labeled), len(sp.unlabeled)) == (2, 5, 5)  # 4:10:10 of 24, scaled to 12
    assert {it.name for it in sp.test} <= set(split["test"]) and {it.name for it in sp.labeled} <= set(split["labeled"])
    assert {it.name for it in sp.unlabeled} <= set(split["unlabeled"]) and sp.val == sp.test
    assert "--limit 12 (a share of each list)" in sp.banner()
    again = data.make_splits("busi", str(root), "1/2", seed=1, limit=12)
    assert [it.name for it in again.labeled] == [it.name for it in sp.labeled]  # seeded
    with pytest.raises(UserError, match="--limit 2: too small to keep an image of each split list"):
        data.make_splits("busi", str(root), "1/2", limit=2)
