#!/usr/bin/env bash
# The main job: train the fmnist preset (18 to 75 minutes on 2 CPU cores, as the machine goes), then
# sample, measure, check and report. Open RUN/report.html to see whether training worked.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/fmnist}
.venv/bin/diffuse train --preset fmnist --out "$RUN"
.venv/bin/diffuse sample "$RUN" --n 5000 --out "$RUN/samples.npz" --grid "$RUN/grid.png"
.venv/bin/diffuse eval "$RUN/samples.npz" --json | tee "$RUN/eval.json"
.venv/bin/diffuse doctor --run "$RUN" || echo "the doctor found a problem: see the table above and $RUN/report.html"
echo "report: $RUN/report.html; grid: $RUN/grid.png (a row per class); metrics: $RUN/metrics.jsonl"
