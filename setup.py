"""Builds the fused causal-attention op (csrc/) into pipeline/kernels/_C with ninja.

The CPU kernel is always compiled, one translation unit per instruction set so that ninja
compiles them in parallel; the AVX-512 one only where it can run (PIPELINE_CPU_ISAS=all: always).
PIPELINE_SKIP_EXTENSION=1 builds no extension (the Makefile's `pip install -e .` sets it, then
builds the extension once, incrementally, with `setup.py build_ext --inplace`).

The CUDA sources (csrc/*.cu) are compiled only when the installed torch is a CUDA build
(torch.version.cuda is set) and a CUDA toolkit is found; PIPELINE_NO_CUDA=1 skips them. A
CPU-only torch cannot link a CUDA extension, so a machine that merely has nvcc installed still
gets the CPU-only build. They are compiled for sm_80 and sm_90, or for TORCH_CUDA_ARCH_LIST
where it is set (benchmarks/device_check.py sets it to the GPU's compute capability).
"""

import glob
import os
import re

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


def cuda_arch_flags() -> list[str]:
    """-gencode flags. The kernels use bf16 mma.sync, cp.async and ldmatrix: sm_80 (A100) and
    newer, so archs below 8.0 in TORCH_CUDA_ARCH_LIST are dropped (container images list every
    arch); without one left, sm_80 and sm_90. Explicit flags also stop torch from adding its own
    (every arch it knows, or the visible GPUs')."""
    listed = re.findall(r"(\d+)\.(\d+)(\+PTX)?", os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    archs = [(major + minor, ptx) for major, minor, ptx in listed if int(major) >= 8]
    archs = archs or [("80", ""), ("90", "")]
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch, _ in archs]
    ptx = [f"-gencode=arch=compute_{arch},code=compute_{arch}" for arch, p in archs if p]
    return flags + ptx


with_avx512 = avx512_wanted()
cpu_sources = sorted(
    path
    for path in glob.glob("csrc/*.cpp")
    if with_avx512 or not path.endswith(("_avx512.cpp", "_amx.cpp"))
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
    extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17", *cuda_arch_flags()]

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
