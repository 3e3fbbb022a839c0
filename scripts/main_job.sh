#!/usr/bin/env bash
# The main job: train the fmnist preset (about 18 minutes on 2 CPU cores), then sample, measure, draw.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/fmnist}
.venv/bin/diffuse train --preset fmnist --out "$RUN"
.venv/bin/diffuse sample "$RUN" --n 5000 --out "$RUN/samples.npz" --grid "$RUN/grid.png"
.venv/bin/diffuse eval "$RUN/samples.npz" --json | tee "$RUN/eval.json"
echo "grid: $RUN/grid.png (a row per class); metrics: $RUN/metrics.jsonl"
