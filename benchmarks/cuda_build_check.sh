#!/usr/bin/env bash
# Compile-only check of the CUDA attention kernels, for machines whose torch is a CPU wheel
# (setup.py then skips the .cu sources, and nothing can be linked or run): nvcc compiles
# csrc/causal_attention_cuda.cu to an object file against torch's headers, with the flags
# torch's CUDAExtension would use, and prints ptxas register / shared-memory usage.
#
#   bash benchmarks/cuda_build_check.sh            # sm_90 only (quick)
#   ARCHS="80 90" bash benchmarks/cuda_build_check.sh
#
# The CPU wheel ships ATen/cuda and c10/cuda headers but not the CMake-generated
# c10/cuda/impl/cuda_cmake_macros.h; -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it (it only
# defines the Windows DLL-export switch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
ARCHS=${ARCHS:-90}
OUT=${OUT_DIR:-build/cuda_build_check}
mkdir -p "$OUT"

includes=()
while IFS= read -r dir; do includes+=("-I$dir"); done < <(
  "$PY" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
gencode=()
for arch in $ARCHS; do gencode+=("-gencode" "arch=compute_${arch},code=sm_${arch}"); done

set -x
"$NVCC" -std=c++17 -O3 --use_fast_math "${gencode[@]}" -c csrc/causal_attention_cuda.cu \
  -o "$OUT/causal_attention_cuda.o" "${includes[@]}" \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 \
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Xptxas -v -Xcompiler -fPIC
