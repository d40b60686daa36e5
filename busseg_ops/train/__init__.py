"""busseg_ops.train: data, methods, training loop, evaluation and the `busseg` command.

`TrainConfig`, `Trainer` and `run` are imported on first use, so that the command line (and
`busseg --help`) does not load the training code it does not need."""

__all__ = ["TrainConfig", "Trainer", "run"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name in ("Trainer", "run"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
