"""Builds busseg_ops._C: the C++/OpenMP CPU kernels always, the CUDA kernels when torch has CUDA
and a toolkit is found (or FORCE_CUDA=1). Build with --no-build-isolation: torch must come from
the environment, never from an isolated build env."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    if not with_cuda():
        return CppExtension(
            "busseg_ops._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    return CUDAExtension(
        "busseg_ops._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("BUSSEG_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="busseg_ops",
    version="0.1.0",
    description="Accelerated operators for relation-aware semi-supervised breast-ultrasound segmentation",
    packages=["busseg_ops", "busseg_ops.reference", "busseg_ops.triton", "busseg_ops.models", "busseg_ops.train"],
    # models/ and train/ live at the top of the repo but install under the busseg_ops namespace.
    package_dir={"busseg_ops": "busseg_ops", "busseg_ops.models": "models", "busseg_ops.train": "train"},
    package_data={"busseg_ops.train": ["configs/*.yaml"]},  # the --preset files
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "train": ["pillow", "matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["busseg = busseg_ops.train.cli:main"]},
)
