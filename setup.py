"""Builds the fused causal-attention op (csrc/) into pipeline/kernels/_C with ninja.

The CPU kernel is always compiled. The CUDA sources (csrc/*.cu) are compiled only when the
installed torch is a CUDA build (torch.version.cuda is set) and a CUDA toolkit is found;
PIPELINE_NO_CUDA=1 skips them. A CPU-only torch cannot link a CUDA extension, so a machine
that merely has nvcc installed still gets the CPU-only build.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

cpu_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*.cu"))
use_cuda = (
    bool(cuda_sources)
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("PIPELINE_NO_CUDA") != "1"
)

cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
extension_cls = CUDAExtension if use_cuda else CppExtension
extra_compile_args = {"cxx": cxx_flags}
if use_cuda:
    # The kernels use bf16 mma.sync, cp.async and ldmatrix: sm_80 (A100) and newer. Explicit
    # -gencode flags also stop torch from adding its own TORCH_CUDA_ARCH_LIST defaults.
    extra_compile_args["nvcc"] = [
        "-O3",
        "--use_fast_math",
        "-std=c++17",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]

setup(
    ext_modules=[
        extension_cls(
            name="pipeline.kernels._C",
            sources=cpu_sources + (cuda_sources if use_cuda else []),
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=[("WITH_CUDA", None)] if use_cuda else [],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
