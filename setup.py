"""Metadata lives in pyproject.toml. This file adds one optional step: when the build environment has a
CUDA build of torch and a CUDA toolkit (`pip install --no-build-isolation .` on a GPU machine), the CUDA
C++ backend is compiled ahead of time as adassl_fast._C_cuda. Everywhere else it is skipped, and the
backend builds itself with ninja on first use instead, from the sources the package ships
(adassl_fast/_cuda_build.py).
ADASSL_FAST_SKIP_CUDA_BUILD=1 skips it on a CUDA machine too (a Triton-only install, ~1 minute faster)."""

import os

from setuptools import setup


def cuda_extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # an isolated build environment has no torch
        return [], {}
    if not (torch.version.cuda and CUDA_HOME) or os.environ.get("ADASSL_FAST_SKIP_CUDA_BUILD") == "1":
        return [], {}
    gencodes = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    ext = CUDAExtension(
        "adassl_fast._C_cuda",
        ["adassl_fast/csrc/binding.cpp", "adassl_fast/csrc/nt_xent.cu", "adassl_fast/csrc/adassl.cu"],
        include_dirs=["adassl_fast/csrc"],
        extra_compile_args={"cxx": ["-O2", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", *gencodes]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
