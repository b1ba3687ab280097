#!/usr/bin/env bash
# Seeds 2-4 at 16x (full, hash, robez, lma) for the synthetic sweep, merged with seeds 0-1 into
# docs/sweeps/synth1m, so the 16x comparison has 5 seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--data synth:1000000:0 --epochs 2 --patience 1 --threads 1 --dim 16 --batch-size 1024
        --lr 1e-3 --interaction dot-cat --min-count 1 --kinds full,hash,robez,lma
        --compressions 16 --no-variants)
.venv/bin/lma -q sweep "${common[@]}" --seeds 2,3 --out docs/sweeps/synth1m/seed23 &
.venv/bin/lma -q sweep "${common[@]}" --seeds 4, --out docs/sweeps/synth1m/seed4
wait
.venv/bin/python -m lma.sweep merge docs/sweeps/synth1m/seed0 docs/sweeps/synth1m/seed1 \
  docs/sweeps/synth1m/seed23 docs/sweeps/synth1m/seed4 \
  --out docs/sweeps/synth1m --title "Sweep on synth:1000000:0 (synthetic data)"
