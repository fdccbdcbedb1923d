#!/usr/bin/env bash
# Every CUDA path once, in a few minutes, as one table: run it whenever a GPU is lent.
#   bash bench/gpu_check.sh            # on the GPU (installs the project first if needed)
#   DEVICE=cpu bash bench/gpu_check.sh # the same checks on the CPU, to test the script
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import cli, torch" 2>/dev/null; then
  pip install -q torch==2.13.0 && pip install -q -e .
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m bench.gpu_check --device "${DEVICE:-cuda}"
