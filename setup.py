"""Builds the fused causal-attention op (csrc/) into pipeline/kernels/_C with ninja.

CUDA sources are compiled only when torch sees a CUDA toolkit; the CPU kernel always is.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

cpu_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*.cu"))
use_cuda = (
    bool(cuda_sources) and CUDA_HOME is not None and os.environ.get("PIPELINE_NO_CUDA") != "1"
)

cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
extension_cls = CUDAExtension if use_cuda else CppExtension
extra_compile_args = {"cxx": cxx_flags}
if use_cuda:
    extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]

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
