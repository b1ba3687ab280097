#!/usr/bin/env bash
# The synthetic AUC-vs-memory sweep of docs/RESULTS.md: 1M synthetic rows (Criteo schema,
# vocabulary ~150k tokens), 2 seeds run as two processes, merged into docs/sweeps/synth1m.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--data synth:1000000:0 --epochs 2 --patience 1 --threads 1 --dim 16 --batch-size 1024
        --lr 1e-3 --interaction dot-cat --min-count 1)
.venv/bin/lma -q sweep "${common[@]}" --seeds 0, --out docs/sweeps/synth1m/seed0 &
.venv/bin/lma -q sweep "${common[@]}" --seeds 1, --out docs/sweeps/synth1m/seed1
wait
.venv/bin/python -m lma.sweep merge docs/sweeps/synth1m/seed0 docs/sweeps/synth1m/seed1 \
  --out docs/sweeps/synth1m --title "Sweep on synth:1000000:0 (synthetic data)"
