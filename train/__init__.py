"""busseg_ops.train: data, methods, training loop, evaluation and the `busseg` command."""

from .engine import TrainConfig, Trainer, run

__all__ = ["TrainConfig", "Trainer", "run"]
