#!/usr/bin/env bash
# GPU check of the fused kernels (under 5 minutes on one GPU):
#   1. the kernel tests on CUDA, real (compiled) Triton, fp32 and bf16 parametrisations;
#   2. the kernel benchmark (bf16, T = 1k..16k) against SDPA/FlashAttention and fla when installed.
# Usage: scripts/gpu_check.sh [OUT_DIR]     (default: bench-kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${1:-bench-kernels}"

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)")
print("device:", torch.cuda.get_device_name())
PY

# The interpreter must be off so the kernels compile for the GPU.
export TRITON_INTERPRET=0
# One launch config per kernel in the tests: autotuning every test shape would only cost compile time.
export LINEARIZE_AUTOTUNE=0
timeout 180 "$PYTHON" -m pytest tests/kernels -q -rs
unset LINEARIZE_AUTOTUNE
timeout 120 "$PYTHON" -c "
from pathlib import Path
from linearize.kernels.benchmark import run_kernel_benchmark
result = run_kernel_benchmark(Path('$OUT'))
print(open(result['files']['markdown']).read())
"
