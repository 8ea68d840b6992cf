#!/usr/bin/env bash
# Equivalence checks of tpshard on one machine: the reference models (and the Hugging Face
# GPT-2 and Llama when transformers is installed), 2 and 4 ranks, float32 and bfloat16.
#
#   benchmarks/gpu_check.sh                  # on the GPU (ranks share it: gloo over CUDA tensors)
#   benchmarks/gpu_check.sh --device cpu     # the same checks on CPU ranks
#
# One JSON line per check, then a summary line; exit status 0 only when every check passed.
# Budget: under 5 minutes on one H100 (the whole run is also capped by `timeout`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=INT --kill-after=10 "${GPU_CHECK_TIMEOUT:-290}" \
    python3 benchmarks/gpu_check.py "$@"
