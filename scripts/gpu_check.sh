#!/usr/bin/env bash
# GPU check, under 8 minutes on one H200 (details: scripts/gpu_check.py):
#   1. pytest tests/kernels on CUDA (compiled Triton, autotuning on, fp32 and bf16) and a
#      Llama-3-8B-shaped layer (GQA 32/8, d=128, F=256) against the CPU reference;
#   2. kernel speed at Llama-3-8B head sizes, T = 2k..16k, vs SDPA/FlashAttention and fla;
#   3. a random Llama-3.2-1B-shaped teacher through the 1B recipe (20 + 20 steps, bf16), export,
#      reload without linearize, generate;
#   4. decode throughput and peak memory, teacher vs student, batch 64 x 4k context.
# Usage: scripts/gpu_check.sh [OUT_DIR] [--smoke]   (OUT_DIR default: results/gpu_check/<date>)
#   --smoke: sections 3 and 4 at tiny shapes on the CPU (tests this script; says nothing about GPUs).
# Writes OUT_DIR/gpu_check.{json,md}; exits 1 if any section failed, 2 without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
