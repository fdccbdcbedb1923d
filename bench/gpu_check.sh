#!/usr/bin/env bash
# Every CUDA path once, in a few minutes, as one table: run it whenever a GPU is lent.
#   bash bench/gpu_check.sh            # on the GPU (installs the project first if needed)
#   DEVICE=cpu bash bench/gpu_check.sh # the same checks on the CPU, to test the script
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep the machine's own (CUDA) torch; install torch only where there is none.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
python -c "import cli, pytest" 2>/dev/null || pip install -q -e '.[test]'

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m bench.gpu_check --device "${DEVICE:-cuda}"
