"""Builds the fused causal-attention op (csrc/) into pipeline/kernels/_C with ninja.

The CPU kernel is always compiled, one translation unit per instruction set so that ninja
compiles them in parallel; the AVX-512 one only where it can run (PIPELINE_CPU_ISAS=all: always).
PIPELINE_SKIP_EXTENSION=1 builds no extension (the Makefile's `pip install -e .` sets it, then
builds the extension once, incrementally, with `setup.py build_ext --inplace`).

The CUDA sources (csrc/*.cu) are compiled only when the installed torch is a CUDA build
(torch.version.cuda is set) and a CUDA toolkit is found; PIPELINE_NO_CUDA=1 skips them. A
CPU-only torch cannot link a CUDA extension, so a machine that merely has nvcc installed still
gets the CPU-only build.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def avx512_wanted() -> bool:
    """The AVX-512 kernels take as long to compile as all the others: build them where they can
    run (torch's own CPU check), or everywhere with PIPELINE_CPU_ISAS=all (a build that moves to
    other machines). Without them the op runs its AVX2 kernels on an AVX-512 CPU."""
    choice = os.environ.get("PIPELINE_CPU_ISAS", "native")
    if choice not in ("native", "all"):
        raise SystemExit(f"PIPELINE_CPU_ISAS must be native or all, not {choice!r}")
    return choice == "all" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


with_avx512 = avx512_wanted()
cpu_sources = sorted(
    path
    for path in glob.glob("csrc/*.cpp")
    if with_avx512 or not path.endswith("_avx512.cpp")
)
cuda_sources = sorted(glob.glob("csrc/*.cu"))
use_cuda = (
    bool(cuda_sources)
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("PIPELINE_NO_CUDA") != "1"
)

# -g0: Python's CFLAGS ask for debug information, a third of the kernels' compile time, and the
# machine code is the same without it. -fno-gcse: GCC's RTL global CSE/PRE pass is superlinear
# in a function's size, and each kernel entry point is one large force-inlined function; its
# loops are already optimised at the tree level, and benchmarks/attention.py measures no loss.
# benchmarks/extension_build.py prints each translation unit's compile time with and without.
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-g0", "-fno-gcse"]
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
    ext_modules=[] if os.environ.get("PIPELINE_SKIP_EXTENSION") == "1" else [
        extension_cls(
            name="pipeline.kernels._C",
            sources=cpu_sources + (cuda_sources if use_cuda else []),
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=[("WITH_CUDA", None)] * use_cuda
            + [("PIPELINE_WITH_AVX512", None)] * with_avx512,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
