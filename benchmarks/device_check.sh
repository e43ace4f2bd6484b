#!/usr/bin/env bash
# The device check (benchmarks/device_check.py): on a lent GPU machine, one command that builds
# the extension for the GPU, runs the CUDA kernel tests and opcheck, times the op against SDPA
# and gpt2-124m pretraining, and writes device_check.json and device_check.md into $OUT; at most
# 8 minutes on one H100/H200.
#
#   bash benchmarks/device_check.sh                 # on the GPU machine
#   bash benchmarks/device_check.sh --cpu-only      # what CI runs: the GPU steps skipped
#   OUT=/tmp/check bash benchmarks/device_check.sh --only attention pretrain
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3): on a GPU machine one
# with a CUDA build of torch, pytest, setuptools and ninja.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "device_check.sh: $PY cannot import torch; set PYTHON to an interpreter with torch" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null &&
  ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "device_check.sh: warning: nvidia-smi is here but $PY's torch sees no CUDA device" \
    "(torch.version.cuda: $("$PY" -c 'import torch; print(torch.version.cuda)')); the GPU steps" \
    "will be skipped" >&2
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/device_check.py --out "${OUT:-results/device_check}" "$@"
