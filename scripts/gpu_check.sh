#!/usr/bin/env bash
# On a CUDA machine: install diffuse, then run the device checks (training, sampling, exact resume,
# DDP with NCCL where there are several devices, bench in fp32 and bf16) in about 10 minutes,
# writing OUT_DIR/gpu_check.md. Usage: bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: this machine has no NVIDIA GPU (nvidia-smi finds none); run it on one with a GPU." >&2
    exit 2
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python scripts/gpu_check.py "${1:-runs/gpu_check}"
