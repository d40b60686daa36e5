"""Tiny configurations shared by the training tests (64 px, narrow U-Net, a handful of steps)."""

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
