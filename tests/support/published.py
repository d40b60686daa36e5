"""The papers' published files, loaded from clones under ``$BUSSEG_UPSTREAM_DIR`` (RA-BUSSeg/ and
PH-Net/), so that the tests and benchmarks can compare busseg_ops.compat (and support/upstream.py)
with them; nothing of theirs is in this repository. The loader makes them run on a CPU (docs/porting.md):
stand-ins for imports the loaded functions never use (sklearn, skimage) and ``Tensor.cuda``
returning the tensor during PH-Net's ``patch_contrast``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

ENV = "BUSSEG_UPSTREAM_DIR"

#: unused by the loaded functions, imported at the top of the files: stand-ins if not installed
_UNUSED_IMPORTS = ("sklearn", "sklearn.cluster", "skimage", "skimage.measure")


def upstream_dir() -> Path | None:
    """``$BUSSEG_UPSTREAM_DIR`` as a Path, None when unset; a set but missing folder is an error."""
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{ENV}={value} is not a folder (it should hold the clones RA-BUSSeg/ and PH-Net/)")
    return path


def missing_requirement() -> str | None:
    """Why the published code cannot run here (None when it can): no ``BUSSEG_UPSTREAM_DIR``, or
    no ``einops``. A reason for pytest.skip."""
    if upstream_dir() is None:
        return f"{ENV} is not set (a folder with clones of RA-BUSSeg/ and PH-Net/, docs/porting.md)"
    if importlib.util.find_spec("einops") is None:
        return "einops is not installed (RA-BUSSeg's Corr needs it: pip install einops)"
    return None


def _clone(name: str) -> Path:
    root = upstream_dir()
    if root is None:
        raise FileNotFoundError(f"{ENV} is not set: it must be a folder holding the clones RA-BUSSeg/ and PH-Net/")
    return root / name


def _file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ENV} must hold the clones RA-BUSSeg/ and PH-Net/")
    return path


class _Unused(types.ModuleType):
    """Stands for a package that the published files import but the loaded functions never use."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unused(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a stand-in (not installed; unused by busseg_ops' checks)")

        return unused


@contextlib.contextmanager
def _importable(root: Path):
    """``root`` first on sys.path and stand-ins for the absent unused imports, both undone after."""
    absent = [name for name in _UNUSED_IMPORTS if importlib.util.find_spec(name.split(".")[0]) is None]
    for name in absent:
        sys.modules[name] = _Unused(name)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in absent:
            sys.modules.pop(name, None)


@functools.cache
def rabusseg() -> types.SimpleNamespace:
    """RA-BUSSeg's ``Corr`` (rabusseg/models/decoder.py) and the losses of
    rabusseg/utils/loss_helper.py, imported from ``$BUSSEG_UPSTREAM_DIR/RA-BUSSeg`` as the package
    ``rabusseg``."""
    root = _clone("RA-BUSSeg")
    _file(root, "rabusseg/models/decoder.py")
    _file(root, "rabusseg/utils/loss_helper.py")
    with _importable(root):
        decoder = importlib.import_module("rabusseg.models.decoder")
        losses = importlib.import_module("rabusseg.utils.loss_helper")
    return types.SimpleNamespace(
        Corr=decoder.Corr,
        compute_rank_loss_landmark=losses.compute_rank_loss_landmark,
        orthogonal_landmarks_refine=losses.orthogonal_landmarks_refine,
        compute_unsupervised_loss=losses.compute_unsupervised_loss,
        compute_corr_loss=losses.compute_corr_loss,
    )


def _cuda_stays(fn):
    """``fn`` with ``Tensor.cuda`` returning the tensor itself during the call."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return run


@functools.cache
def phnet() -> types.SimpleNamespace:
    """PH-Net's model/patch_helper.py from ``$BUSSEG_UPSTREAM_DIR/PH-Net``; ``patch_contrast``
    keeps its tensors on their device (its ``.cuda()`` calls return the tensor)."""
    path = _file(_clone("PH-Net"), "model/patch_helper.py")
    spec = importlib.util.spec_from_file_location("phnet_published_patch_helper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plain = ("get_patchs", "devide_into_patchs", "compute_hard_ratio", "generate_patch_mask", "generate_patch_data")
    return types.SimpleNamespace(
        **{name: getattr(module, name) for name in plain + ("count_lu_couple",)},
        patch_contrast=_cuda_stays(module.patch_contrast),
    )
