#!/usr/bin/env bash
# The main job: train the fmnist preset, then sample, measure, check and report; each phase's seconds are
# printed as it ends and the lot in RUN/phases.txt. Open RUN/report.html to see whether training worked.
# Usage: bash scripts/main_job.sh [RUN] [SEED]   (defaults: runs/fmnist, seed 0 for training and sampling)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/fmnist}
SEED=${2:-0}
phase() {  # phase NAME COMMAND...: run COMMAND, then say how long it took
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "phase $name: $((SECONDS - start)) s" | tee -a "$RUN/phases.txt"
}
mkdir -p "$RUN"
phase train .venv/bin/diffuse train --preset fmnist --out "$RUN" --set train.seed="$SEED"
phase sample .venv/bin/diffuse sample "$RUN" --n 5000 --seed "$SEED" --out "$RUN/samples.npz" --grid "$RUN/grid.png"
phase eval bash -c '.venv/bin/diffuse eval "$1/samples.npz" --json | tee "$1/eval.json"' _ "$RUN"
phase doctor bash -c '.venv/bin/diffuse doctor --run "$1" \
    || echo "the doctor found a problem: see the table above and $1/report.html"' _ "$RUN"
echo "report: $RUN/report.html; grid: $RUN/grid.png (a row per class); metrics: $RUN/metrics.jsonl"
