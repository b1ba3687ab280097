#!/usr/bin/env bash
# The main job of `make serve`: synthetic Criteo-schema data -> small LMA model -> bundle -> server.
# Usage: scripts/quickstart.sh [ARTIFACTS_DIR] [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
ART=${1:-artifacts}
PORT=${2:-8000}
LMA=.venv/bin/lma

echo "== training a small LMA model on 200,000 synthetic rows (Criteo schema, synthetic data)"
"$LMA" train --data synth:200000:0 --embedding lma --compression 16 --epochs 2 \
  --batch-size 1024 --out "$ART/model"
echo "== metrics (synthetic data): $ART/model/metrics.json"

echo "== exporting the bundle to $ART/bundle"
"$LMA" export "$ART/model" --out "$ART/bundle" --name ctr
"$LMA" verify "$ART/bundle"

echo "== serving $ART/bundle on http://127.0.0.1:$PORT (Ctrl-C stops it)"
"$LMA" serve "$ART/bundle" --host 0.0.0.0 --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER' INT TERM
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "the server exited"; exit 1; }
  sleep 0.5
done
REQUEST='{"instances": [{"I1": 3, "I2": 20, "C1": "68fd1e64", "C2": "80e26c9b"}, {"I5": 1382, "C3": "fb936136"}]}'
echo "== a request (the answer below is this model's):"
echo "curl -s -X POST http://127.0.0.1:$PORT/v1/models/ctr:predict -H 'Content-Type: application/json' -d '$REQUEST'"
curl -s -X POST "http://127.0.0.1:$PORT/v1/models/ctr:predict" -H 'Content-Type: application/json' -d "$REQUEST"
echo
echo "== API docs: http://127.0.0.1:$PORT/docs   metrics: http://127.0.0.1:$PORT/metrics"
wait $SERVER
