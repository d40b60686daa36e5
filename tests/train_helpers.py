"""Tiny configurations shared by the training tests (64 px, narrow U-Net, a handful of steps), and
a small BUSI-like data set with split lists."""

import os

import numpy as np
from PIL import Image

from busseg_ops.train import TrainConfig


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(
        synthetic_n=24,
        crop=64,
        synthetic_size=64,
        epochs=2,
        max_steps=2,
        batch_labeled=2,
        batch_unlabeled=2,
        warmup_epochs=0,
        unet_base=4,
        proj_dim=16,
        rep_dim=16,
        num_proxies=8,
        overlays=2,
        out=str(tmp_path / "run"),
        quiet=True,
        gamma=0.5,
        stage1_epochs=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def fake_busi(root, per_class=6, size=(40, 52), lists=True, upstream=False) -> dict:
    """A BUSI folder (`<class>/<class> (N).png` + `_mask.png`; `upstream`: image/ + label/) of
    `per_class` benign and malignant images with a dark lesion each, and with `lists` the split
    lists in root/splits: a sixth of the images test, the rest halved labelled / unlabelled.
    Returns {"test": names, "labeled": names, "unlabeled": names}."""
    rng = np.random.RandomState(0)
    names = []
    for c in ("benign", "malignant"):
        for i in range(1, per_class + 1):
            name = f"{c} ({i}).png"
            img = rng.randint(120, 220, size).astype(np.uint8)
            mask = np.zeros(size, np.uint8)
            y, x = rng.randint(4, size[0] // 2), rng.randint(4, size[1] // 2)
            mask[y : y + 10, x : x + 12] = 255
            img[mask > 0] //= 3
            folders = ("image", "label") if upstream else (c, c)
            for d in folders:
                os.makedirs(os.path.join(root, d), exist_ok=True)
            Image.fromarray(img).save(os.path.join(root, folders[0], name))
            mask_name = name if upstream else f"{c} ({i})_mask.png"
            Image.fromarray(mask).save(os.path.join(root, folders[1], mask_name))
            names.append(name)
    n_test = max(1, len(names) // 6)
    split = {"test": names[::6][:n_test]}
    rest = [n for n in names if n not in split["test"]]
    split["labeled"], split["unlabeled"] = rest[::2], rest[1::2]
    if lists:
        write_lists(os.path.join(root, "splits"), split)
    return split


def write_lists(folder, split: dict) -> None:
    os.makedirs(os.path.join(folder, "1_2"), exist_ok=True)
    with open(os.path.join(folder, "test.txt"), "w") as f:
        f.write("".join(n + "\n" for n in split["test"]))
    for k in ("labeled", "unlabeled"):
        with open(os.path.join(folder, "1_2", f"{k}.txt"), "w") as f:
            f.write("".join(n + "\n" for n in split[k]))
