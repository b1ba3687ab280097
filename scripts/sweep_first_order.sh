#!/usr/bin/env bash
# Embedding kinds at 1x and 16x with and without the first-order term, Criteo 10k sample, 5 seeds
# (docs/RESULTS.md section 1, "The first-order term with compressed kinds").
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${LMA_SHARED_DATA:-../shared/data}
common=(--data "criteo:$DATA/criteo/train_10k.tsv" --min-count 5 --seeds 5 --epochs 30 --patience 3
        --threads 1 --jobs 2 --dim 16 --weight-decay 3e-4 --interaction dot-cat --batch-size 256
        --lr 1e-3 --standardize-dense --no-variants --kinds full,hash,robez,lma --compressions 1,16)
.venv/bin/lma -q sweep "${common[@]}" --out docs/sweeps/criteo10k_plain
.venv/bin/lma -q sweep "${common[@]}" --first-order --first-order-l2 2e-3 --first-order-lr 3e-3 \
  --out docs/sweeps/criteo10k_first_order
