#!/usr/bin/env bash
# The AUC-vs-memory sweeps of docs/RESULTS.md on the real 10k-row samples (5 seeds each).
# Usage: scripts/sweep_real.sh [criteo|avazu|both]   (resumes where it stopped)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${LMA_SHARED_DATA:-../shared/data}
which=${1:-both}
common=(--seeds 5 --epochs 10 --patience 2 --threads 1 --dim 16 --weight-decay 3e-4
        --interaction dot-cat --batch-size 256 --lr 1e-3)
if [[ $which == criteo || $which == both ]]; then
  .venv/bin/lma sweep --data "criteo:$DATA/criteo/train_10k.tsv" --min-count 5 "${common[@]}" \
    --out docs/sweeps/criteo10k
fi
if [[ $which == avazu || $which == both ]]; then
  .venv/bin/lma sweep --data "avazu:$DATA/avazu/train_9999.csv" --min-count 2 "${common[@]}" \
    --out docs/sweeps/avazu10k
fi
