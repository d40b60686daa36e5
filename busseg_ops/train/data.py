"""Datasets (BUSI, UDIAT, an image/mask folder, the synthetic default), split lists and partitions.
Every file, list and mask is checked before training starts: a missing or malformed one is an
error naming it, never a fallback (what is read and how: docs/methods.md)."""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import augment, synthetic
from .config import normalise_partition, partition_fraction
from .errors import UserError

CLASSES = {"benign": 0, "malignant": 1, "normal": 2}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_NAME = re.compile(r".*_mask(_\d+)?")  # BUSI's ground truth: NAME_mask.png, NAME_mask_1.png, ...


class DataError(UserError):
    """A missing or unreadable data file; the message names it."""


@dataclass(frozen=True)
class Item:
    name: str  # the name used in split lists (BUSI: "benign (3).png")
    image: str = ""  # image path ("" for synthetic items)
    masks: tuple[str, ...] = ()  # mask paths, merged by union; () = no mask (unlabelled)
    cls: int = -1  # class index (CLASSES), -1 unknown
    seed: int | None = None  # synthetic items: generator seed
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class DataWarning(UserWarning):
    """Data that is read, but maybe not as the user expects (12-bit values in a 16-bit file)."""


_warned_low_bits = False


def _open_image(path: str):
    """The decoded Pillow image; a missing or undecodable file is a DataError naming it."""
    from PIL import Image  # Pillow is only needed for real data

    if not os.path.isfile(path):
        raise DataError(f"missing data file: {path}")
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as err:  # PIL raises several types for corrupt files
        reason = "not an image Pillow can decode" if "cannot identify" in str(err) else " ".join(str(err).split())
        raise DataError(f"cannot read image file {path}: {reason}") from err


def read_gray(path: str) -> np.ndarray:
    """8-bit grayscale array from an image file of any common encoding; errors name the file."""
    global _warned_low_bits
    with _open_image(path) as im:
        if im.mode.startswith("I"):  # 16-bit (I;16, I;16B, or I from 16-bit PNG/TIFF): 65535 → 255
            a = np.asarray(im, dtype=np.float64)
            if 0 < a.max() <= 4095 and not _warned_low_bits:
                _warned_low_bits = True
                warnings.warn(
                    f"{path}: a 16-bit image whose values stay below 4096 (12-bit data?) is read with 65535 → 255, "
                    "so it spans only 16 grey levels; convert such images to 8 bits (value · 255 / 4095) first "
                    "(further ones are not reported)",
                    DataWarning,
                    stacklevel=2,
                )
            return np.clip(np.rint(a / 257), 0, 255).astype(np.uint8)
        return np.asarray(im.convert("L"), dtype=np.uint8)


def _values(a: np.ndarray, most: int = 6) -> str:
    v = np.unique(a)
    return ", ".join(str(x) for x in v[:most]) + (f", ... ({len(v)} values)" if len(v) > most else "")


def read_mask(path: str) -> np.ndarray:
    """A binary mask as uint8 0/1: 0 and 255, or 0 and 1 (8 or 16 bits; also 0 and 65535), in
    gray, RGB-encoded gray or opaque RGBA. Anything else (a label map with 1 and 2, a colour mask,
    the lesion in the alpha channel, a lossy JPEG's in-between values) is a DataError naming the
    values found."""
    with _open_image(path) as im:
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            mode = im.mode
        a = np.asarray(im)
    if mode in ("RGBA", "LA", "PA") and (a[..., -1] != 255).any():
        raise DataError(
            f"mask {path}: {mode} with a transparent part (alpha values {_values(a[..., -1])}): the lesion may be in "
            "the alpha channel; expected an opaque binary mask"
        )
    if mode in ("RGB", "RGBA"):
        if (a[..., 0] != a[..., 1]).any() or (a[..., 0] != a[..., 2]).any():
            raise DataError(f"mask {path}: a colour mask (red, green and blue differ); expected a binary gray mask")
        a = a[..., 0]
    elif mode in ("LA", "PA"):
        a = a[..., 0]
    if mode == "1":
        return a.astype(np.uint8)
    on = set(np.unique(a).tolist()) - {0}
    if len(on) > 1 or not on <= {1, 255, 65535}:
        raise DataError(f"mask {path}: values {_values(a)}; expected a binary mask (0 and 255, or 0 and 1)")
    return (a > 0).astype(np.uint8)


def load_item(item: Item, synthetic_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 image (H, W), uint8 mask 0/1 (H, W) or None when the item has no mask)."""
    if item.seed is not None:
        img, mask, _ = synthetic.make_image(item.seed, synthetic_size)
        return img, mask
    img = read_gray(item.image)
    if not item.masks:
        return img, None
    mask = np.zeros(img.shape, dtype=np.uint8)
    for p in item.masks:
        m = read_mask(p)
        if m.shape != img.shape:
            raise DataError(
                f"mask {p} is {m.shape[1]}x{m.shape[0]} but image {item.image} is {img.shape[1]}x{img.shape[0]}"
            )
        mask |= m
    return img, mask


# ----------------------------------------------------------------------------------------------
# Layouts


def upstream_items(root: str) -> list[Item]:
    """The RA-BUSSeg/U2PL layout: `image/NAME` with `label/NAME`, all classes in one folder; the
    class comes from the name (`benign (3).png`, `000009_Benign.png`)."""
    items = folder_items(os.path.join(root, "image"), os.path.join(root, "label"))
    out = []
    for it in items:
        low = it.name.lower()
        cls = next((c for n, c in CLASSES.items() if n in low), -1)
        out.append(Item(it.name, it.image, it.masks, cls))
    return out


def _is_upstream_layout(root: str) -> bool:
    return os.path.isdir(os.path.join(root, "image")) and os.path.isdir(os.path.join(root, "label"))


def busi_items(root: str, include_normal: bool = False) -> list[Item]:
    """BUSI: `<class>/<class> (N).png` with `_mask.png` and optional `_mask_1.png`, ... (union), or
    upstream's `image/` + `label/` (see upstream_items)."""
    if not os.path.isdir(os.path.join(root, "benign")) and _is_upstream_layout(root):
        return upstream_items(root)
    items = []
    for cname, cidx in CLASSES.items():
        if cname == "normal" and not include_normal:
            continue
        d = os.path.join(root, cname)
        if not os.path.isdir(d):
            if cname == "normal":
                continue
            raise DataError(f"BUSI class folder missing: {d}")
        files = set(os.listdir(d))
        for f in files:
            stem, ext = os.path.splitext(f)
            if is_mask_name(stem) or ext.lower() not in IMAGE_EXTS:
                continue
            masks = sorted(
                (m for m in files if re.fullmatch(re.escape(stem) + r"_mask(_\d+)?" + re.escape(ext), m)),
                key=lambda m: (len(m), m),
            )
            if not masks:
                raise DataError(f"BUSI image {os.path.join(d, f)} has no mask file {stem}_mask{ext}")
            items.append(Item(f, os.path.join(d, f), tuple(os.path.join(d, m) for m in masks), cidx))
    if not items:
        raise DataError(f"no BUSI images found under {root}")
    return sorted(items, key=lambda it: _natural(it.name))


def udiat_items(root: str) -> list[Item]:
    """UDIAT Dataset B: `original/NAME.png` with `GT/NAME.png`, or upstream's `image/` + `label/`."""
    if not os.path.isdir(os.path.join(root, "original")) and _is_upstream_layout(root):
        return upstream_items(root)
    return folder_items(os.path.join(root, "original"), os.path.join(root, "GT"))


def is_mask_name(stem: str) -> bool:
    return MASK_NAME.fullmatch(stem) is not None


def folder_items(image_dir: str, mask_dir: str | None = None) -> list[Item]:
    """Generic pair of folders; a mask is `NAME.ext` or `NAME_mask.ext` in `mask_dir` (any image
    extension). Without `mask_dir` the items are unlabelled (for `busseg predict`), and files named
    as masks (`NAME_mask.png`, `NAME_mask_1.png`, ...) are not images."""
    if not os.path.isdir(image_dir):
        raise DataError(f"image folder missing: {image_dir}")
    masks = {}
    if mask_dir is not None:
        if not os.path.isdir(mask_dir):
            raise DataError(f"mask folder missing: {mask_dir}")
        for m in os.listdir(mask_dir):
            stem, ext = os.path.splitext(m)
            if ext.lower() in IMAGE_EXTS:
                masks[stem[:-5] if stem.endswith("_mask") else stem] = os.path.join(mask_dir, m)
    items = []
    for f in sorted(os.listdir(image_dir), key=_natural):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTS or (mask_dir is None and is_mask_name(stem)):
            continue
        if mask_dir is not None and stem not in masks:
            raise DataError(f"no mask for {os.path.join(image_dir, f)} in {mask_dir}")
        items.append(Item(f, os.path.join(image_dir, f), (masks[stem],) if mask_dir else ()))
    if not items:
        raise DataError(f"no images found in {image_dir}")
    return items


def synthetic_items(n: int, seed: int = 0) -> list[Item]:
    """n synthetic images; item i is generated from seed·100003 + i (a stable function of both)."""
    out = []
    for i in range(n):
        s = seed * 100003 + i
        out.append(Item(f"synthetic_{i:05d}.png", seed=s, cls=synthetic.make_image(s, 16)[2]))
    return out


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------
# Splits and partitions


def read_list(path: str) -> list[str]:
    """The image names of a split list, one a line; a missing or empty list, or a name listed twice,
    is a DataError naming the list."""
    if not os.path.isfile(path):
        raise DataError(f"split list missing: {path}")
    with open(path) as f:
        lines = [(i + 1, ln.strip()) for i, ln in enumerate(f) if ln.strip()]
    if not lines:
        raise DataError(f"split list {path} is empty")
    first = {}
    for line, name in lines:
        if name in first:
            raise DataError(f"split list {path}: {name!r} is listed twice (lines {first[name]} and {line})")
        first[name] = line
    return [name for _, name in lines]


def check_disjoint(lists: dict[str, list[str]]) -> None:
    """No image in two of the lists {name: image names} (test vs training: a leak; labelled vs
    unlabelled: an image in two roles)."""
    names = list(lists)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sorted(set(lists[a]) & set(lists[b]), key=_natural)
            if common:
                why = "a train/test leak" if "test" in (a + b) else "one image in two roles"
                raise DataError(f"split lists: {len(common)} image(s) in both {a} and {b} ({why}), e.g. {common[0]!r}")


def select(items: list[Item], names: list[str], what: str) -> list[Item]:
    by = {it.name: it for it in items}
    missing = [n for n in names if n not in by]
    if missing:
        raise DataError(f"{what}: {len(missing)} listed names not found in the data, e.g. {missing[0]!r}")
    return [by[n] for n in names]


def split_811(items: list[Item], seed: int = 0) -> tuple[list[Item], list[Item], list[Item]]:
    """Seeded 8:1:1 train/val/test split (used when no split lists are given)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1, round(n / 10))
    n_val = max(1, round(n / 10))
    return order[: n - n_val - n_test], order[n - n_val - n_test : n - n_test], order[n - n_test :]


def partition(
    train: list[Item], fraction: float, seed: int = 0, labeled_pool: list[Item] | None = None
) -> tuple[list[Item], list[Item]]:
    """(labelled, unlabelled) with round(fraction·len(train)) labelled images drawn with `seed`
    from `labeled_pool` (default: the whole training set); the rest of the training set is
    unlabelled. BUSI's 1/4 and 1/8 take the subset from the authors' 1/2 labelled list."""
    pool = list(labeled_pool if labeled_pool is not None else train)
    k = max(1, round(fraction * len(train)))
    if k > len(pool):
        raise UserError(f"--partition: {k} labelled images needed, the labelled pool has {len(pool)}")
    chosen = set(it.name for it in random.Random(seed).sample(pool, k))
    return [it for it in train if it.name in chosen], [it for it in train if it.name not in chosen]


def proportional_subset(lists: dict[str, list], limit: int, seed: int) -> dict[str, list]:
    """A seeded subset of `limit` names in all, each list keeping its share (largest remainders;
    at least one of each), each in its list's order: `--limit` with split lists."""
    total = sum(len(v) for v in lists.values())
    exact = {k: limit * len(v) / total for k, v in lists.items()}
    take = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: take[k] - exact[k])[: limit - sum(take.values())]:
        take[k] += 1
    short = [k for k, n in take.items() if n == 0]
    if short:
        raise UserError(f"--limit {limit}: too small to keep an image of each split list ({', '.join(short)})")
    out = {}
    for k, v in lists.items():
        chosen = set(random.Random(f"{seed}/{k}").sample(range(len(v)), take[k]))
        out[k] = [x for i, x in enumerate(v) if i in chosen]
    return out


@dataclass
class Splits:
    labeled: list[Item]
    unlabeled: list[Item]
    val: list[Item]
    test: list[Item]
    source: dict = field(default_factory=dict)  # how the sets were formed (see make_splits)

    def banner(self) -> str:
        """One line: where the data comes from, how it was split, and the size of each set."""
        s = self.source
        where = s.get("data", "?") + (f" at {s['root']}" if s.get("root") else "")
        if s.get("split") == "lists":
            how = f"split lists in {s['split_dir']} ({', '.join(s['lists'].values())}), partition {s.get('protocol')}"
        else:
            how = f"random 8:1:1 split, partition {s.get('partition')}"
        if s.get("limit"):
            how += f", --limit {s['limit']}" + (" (a share of each list)" if s.get("split") == "lists" else "")
        sizes = (
            f"{len(self.labeled)} labelled, {len(self.unlabeled)} unlabelled, {len(self.val)} validation "
            f"({s.get('validation', '?')}), {len(self.test)} test"
        )
        return f"data: {where}; {how}; seed {s.get('seed')}: {sizes}"

    def describe(self) -> dict:
        """The banner as data (data.json in a run folder): the source and every set's image names."""
        return {
            **self.source,
            "sizes": {k: len(getattr(self, k)) for k in ("labeled", "unlabeled", "val", "test")},
            "images": {k: [it.name for it in getattr(self, k)] for k in ("labeled", "unlabeled", "val", "test")},
        }


def make_splits(
    data: str,
    root: str | None = None,
    partition_: str | float = "1/4",
    seed: int = 0,
    split_dir: str | None = None,
    synthetic_n: int = 200,
    limit: int | None = None,
    mask_dir: str | None = None,
    val_count: int = 0,
    split: str | None = None,
    labeled_share: float | None = None,
) -> Splits:
    """Items for a run. `split` "lists": the split lists in `split_dir` (BUSI: `<root>/splits` by
    default): test.txt and 1_N/{labeled,unlabeled}.txt for the partition 1/N when that folder
    exists, else 1_2/ with 1/N's labelled set drawn with `seed` from the 1/2 labelled list (1/1:
    both lists labelled). "random": a seeded 8:1:1 split, then the partition. None: lists for busi
    or when `split_dir` is given, random otherwise. A missing folder or list is an error, never a
    fallback to the random split. `limit` keeps a seeded subset of that many images: of each list
    in proportion with split lists (every image keeps its role), before the 8:1:1 split without.
    With split lists the validation set is the test list (as the authors select models), unless
    `val_count` > 0: then that many training images, drawn with `seed` from those left unlabelled
    by the partition, are the validation set and leave the unlabelled pool (the labelled set stays
    the protocol's). `labeled_share` replaces the partition: that share of the whole training set
    (both lists; with `val_count`, of what is left after the validation images, which are then
    drawn from the whole training set, so every share has the same validation set) is labelled,
    drawn with `seed`."""
    if data == "synthetic":
        items = synthetic_items(synthetic_n, seed)
    elif data == "busi":
        items = busi_items(_need(root, data))
    elif data == "udiat":
        items = udiat_items(_need(root, data))
    elif data == "folder":
        items = folder_items(_need(root, data), mask_dir or os.path.join(root, "masks"))
    else:
        raise UserError(f"--data {data!r}: expected synthetic, busi, udiat or folder")
    if split is None:
        split = "lists" if data == "busi" or split_dir else "random"
    frac = partition_fraction(partition_)
    part = normalise_partition(partition_)
    source = dict(data=data, root=os.path.abspath(root) if root else None, split=split, seed=seed, partition=part)
    source["limit"] = limit
    if labeled_share is not None:
        source["partition"] = f"labelled share {labeled_share:g}"
    if split == "lists":
        lab, unl, test, source = _from_lists(items, data, root, split_dir, part, frac, seed, limit, source)
        val = test  # No validation list is published: model selection uses the test list, as the authors do.
        source["validation"] = "the test list"
        pool = lab + unl if labeled_share is not None else unl  # where the validation images come from
        if val_count:
            if val_count >= len(pool):
                what = "training" if labeled_share is not None else "unlabelled training"
                raise UserError(f"--val-from-train {val_count}: only {len(pool)} {what} images left")
            carved = {it.name for it in random.Random(seed).sample(pool, val_count)}
            val = [it for it in pool if it.name in carved]
            lab, unl = [it for it in lab if it.name not in carved], [it for it in unl if it.name not in carved]
            where = (
                "the training set, before the labelled share" if labeled_share is not None else "the unlabelled pool"
            )
            source["validation"] = f"{val_count} images drawn from {where}"
        if labeled_share is not None:
            lab, unl = partition(lab + unl, labeled_share, seed)
            source["protocol"] = f"labelled share {labeled_share:g} of both training lists, drawn with the seed"
        return Splits(lab, unl, val, test, source)
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    if len(items) < 4:
        raise UserError(f"{'--limit' if limit else 'data'}: {len(items)} images; the 8:1:1 split needs at least 4")
    train, val, test = split_811(items, seed)
    lab, unl = partition(train, frac if labeled_share is None else labeled_share, seed)
    source["validation"] = "the split's"
    return Splits(lab, unl, val, test, source)


def _from_lists(items, data, root, split_dir, part, frac, seed, limit, source):
    """(labelled, unlabelled, test, source) from the split lists (see make_splits)."""
    if split_dir is None:
        split_dir = os.path.join(root, "splits")
        if not os.path.isdir(split_dir):
            raise DataError(
                f"--data {data}: no split lists at {split_dir} (test.txt, 1_2/labeled.txt, 1_2/unlabeled.txt); give "
                "--split-dir DIR, or --split-mode random for a seeded 8:1:1 split"
            )
    if not os.path.isdir(split_dir):
        raise DataError(f"--split-dir {split_dir}: no such folder")
    n = part.split("/")[1]
    own = os.path.isfile(os.path.join(split_dir, f"1_{n}", "labeled.txt"))
    folder = f"1_{n}" if own else "1_2"
    files = {"test": "test.txt", "labeled": f"{folder}/labeled.txt", "unlabeled": f"{folder}/unlabeled.txt"}
    lists = {k: read_list(os.path.join(split_dir, f)) for k, f in files.items()}
    check_disjoint({files[k]: v for k, v in lists.items()})
    if limit is not None and limit < sum(len(v) for v in lists.values()):
        lists = proportional_subset(lists, limit, seed)
    test = select(items, lists["test"], files["test"])
    lab = select(items, lists["labeled"], files["labeled"])
    unl = select(items, lists["unlabeled"], files["unlabeled"])
    source.update(split_dir=os.path.abspath(split_dir), lists=files)
    if frac == 1:
        lab, unl = lab + unl, []
        source["protocol"] = f"1/1: both {folder} lists labelled"
    elif not own:
        lab, unl = partition(lab + unl, frac, seed, labeled_pool=lab)
        source["protocol"] = f"{part}: labelled drawn with the seed from 1_2/labeled.txt, the rest unlabelled"
    else:
        source["protocol"] = f"{part}: the lists of {folder}"
    return lab, unl, test, source


def splits_for(cfg) -> Splits:
    """make_splits with a TrainConfig's data fields."""
    return make_splits(
        cfg.data,
        cfg.root,
        cfg.partition,
        cfg.seed,
        cfg.split_dir,
        cfg.synthetic_n,
        cfg.limit,
        cfg.mask_dir,
        val_count=cfg.val_from_train,
        split=cfg.split_mode,
        labeled_share=cfg.labeled_share,
    )


def _need(root, data):
    if not root:
        raise UserError(f"--root is required for --data {data}")
    if not os.path.isdir(root):
        raise UserError(f"--root {root}: no such folder")
    return root


def check_items(splits: Splits, progress: bool = True) -> None:
    """Open and decode every file of every split once (images, masks, their sizes), with a progress
    bar, before any training step; all problems are reported together."""
    items = {it.name: it for part in (splits.labeled, splits.unlabeled, splits.val, splits.test) for it in part}
    real = [it for it in items.values() if it.seed is None]
    if not real:
        return
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(real, desc="checking data files", unit="img", leave=False, disable=None)
        except ImportError:
            pass
    problems = []
    for it in bar if bar is not None else real:
        try:
            load_item(it)
        except DataError as err:
            problems.append(str(err))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} of {len(real)} data files cannot be used:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# torch Dataset


class SegDataset(torch.utils.data.Dataset):
    """Returns dict(image (1, S, S) float in [0, 1], mask (S, S) int64 with 255 = ignore, cls, index).
    labeled=False hides the mask (unlabelled stream): 0 everywhere except padding.

    train=True: `size` is the crop side; the original image is randomly scaled within `scale`
    (aspect kept), flipped and cropped (augment.weak) with a generator seeded by (seed, epoch,
    index), so a sample depends on nothing else: identical across worker counts, ranks and resumes.
    train=False: the image resized to size×size. `fov` > 0 (training): each image first resized,
    aspect kept, so that its longer side is `fov` (the field of view option; evaluation does the
    same in evaluate.predict).
    """

    def __init__(
        self,
        items: list[Item],
        size: int,
        train: bool = False,
        seed: int = 0,
        synthetic_size: int | None = None,
        labeled: bool = True,
        scale: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        fov: int = 0,
    ):
        self.items, self.size, self.train, self.seed, self.fov = items, size, train, seed, fov
        self.labeled, self.scale, self.flip = labeled, scale, flip
        self.synthetic_size = synthetic_size or size
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if i not in self._cache:
            self._cache[i] = load_item(self.items[i], self.synthetic_size)
        return self._cache[i]

    def __getitem__(self, i: int) -> dict:
        img, mask = self.raw(i)
        image = torch.from_numpy(img.copy()).float().div_(255)[None]  # cached array stays read-only
        if mask is not None and self.labeled:
            target = torch.from_numpy(mask).long()
        else:  # unlabelled: 0 inside the image, so that padding (255) still marks invalid pixels
            target = torch.zeros(img.shape, dtype=torch.long)
        if self.train:
            if self.fov:
                image, target = augment.resize(image, target, augment.fov_size(*target.shape, self.fov))
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % (2**62))
            image, target = augment.weak(image, target, self.size, g, self.scale, self.flip)
        else:
            image, target = augment.resize(image, target, self.size)
        return {"image": image, "mask": target, "cls": self.items[i].cls, "index": i}
