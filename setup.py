"""Builds busseg_ops._C: the C++/OpenMP CPU kernels always, the CUDA kernels when torch has CUDA
and a toolkit is found (or FORCE_CUDA=1), against the torch installed in the environment that
runs pip. Plain `pip install -e .` and `pip install .` get it through the in-tree build backend
(build_backend/busseg_build_backend.py); `pip install --no-build-isolation -e .` and
`python setup.py build_ext --inplace` import it directly. torch is never a build requirement:
pip would download another torch into the isolated build environment and build against that."""

import glob
import os
import sys

try:
    import torch
except (ImportError, OSError) as err:  # OSError: a torch whose shared libraries do not load
    sys.exit(
        f"busseg_ops: building needs PyTorch, but {sys.executable} cannot import it ({err}); install torch into the "
        "environment you run pip from (`pip install torch`, or the build for your CUDA from "
        "https://pytorch.org/get-started/locally/) and run pip again; if torch is installed there already, "
        "`pip install --no-build-isolation -e .` builds against it."
    )

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def optimization_level() -> str:
    """-O3 unless BUSSEG_OPT says otherwise: BUSSEG_OPT=0 compiles in a fifth of the time, for tests
    of the build and install machinery (tests/test_packaging.py), never for use."""
    level = os.environ.get("BUSSEG_OPT", "3")
    if level not in ("0", "1", "2", "3"):
        sys.exit(f"busseg_ops: BUSSEG_OPT must be 0, 1, 2 or 3, not {level!r}")
    return level


def extension():
    # csrc/<op>/: schema.cpp, autograd.cpp and cpu.cpp always, cuda.cu and cuda_binding.cpp in CUDA builds
    sources = sorted(
        glob.glob("csrc/*.cpp")
        + glob.glob("csrc/*/schema.cpp")
        + glob.glob("csrc/*/autograd.cpp")
        + glob.glob("csrc/*/cpu.cpp")
    )
    # -g0: Python's own build flags (which setuptools passes on) ask for debug info, which makes the
    # objects six times larger and costs a third of the compile time; torch's libraries ship without.
    cxx = [f"-O{optimization_level()}", "-g0", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    if not with_cuda():
        return CppExtension(
            "busseg_ops._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    sources += sorted(glob.glob("csrc/*/cuda.cu") + glob.glob("csrc/*/cuda_binding.cpp"))
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    return CUDAExtension(
        "busseg_ops._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("BUSSEG_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


def torch_requirement() -> str:
    """The extension links against libtorch's C++ API, which changes between minor releases (not
    between patch releases): the package needs the minor release of torch it was built with."""
    major, minor = torch.__version__.split(".")[:2]
    return f"torch=={major}.{minor}.*"


class BuildExtensionKeepingObjects(BuildExtension):
    """BuildExtension (ninja, the default). setuptools compiles an editable install in a fresh
    temporary folder; this keeps its objects where a plain build keeps them (build/temp.*), so that
    reinstalling, `make build` and `pip wheel` recompile only what changed."""

    def finalize_options(self):
        super().finalize_options()
        if self.editable_mode:
            plain_build = self.distribution.get_command_class("build")(self.distribution)
            plain_build.ensure_finalized()
            self.build_temp = plain_build.build_temp


setup(
    name="busseg_ops",
    version="0.1.0",
    description="Accelerated operators for relation-aware semi-supervised breast-ultrasound segmentation",
    packages=find_packages(include=["busseg_ops", "busseg_ops.*"]),
    package_data={"busseg_ops.train": ["configs/*.yaml"]},  # the --preset files
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionKeepingObjects},
    python_requires=">=3.10",
    install_requires=[torch_requirement(), "numpy"],
    extras_require={"triton": ["triton"], "train": ["pillow", "matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["busseg = busseg_ops.train.cli:main"]},
)
