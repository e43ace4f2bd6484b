"""The CUDA kernels must keep compiling even where no GPU runs them (this CI: a CPU torch with
nvcc installed). With a CUDA build of torch, `make setup` compiles them for real instead."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin").glob("nvcc")),
    None,
)


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="no nvcc: the CUDA sources cannot be compiled here")
@pytest.mark.skipif(torch.version.cuda is not None, reason="CUDA torch: setup.py builds them")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "cuda_build_check.sh")],
        cwd=REPO,
        env={**os.environ, "NVCC": NVCC, "OUT_DIR": str(tmp_path), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "causal_attention_cuda.o").stat().st_size > 0
