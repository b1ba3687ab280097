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
"$LMA" export "$ART/model" --out "$ART/bundle"
"$LMA" verify "$ART/bundle"

if .venv/bin/python -c "import service.main" 2>/dev/null; then
  echo "== serving $ART/bundle on http://127.0.0.1:$PORT"
  LMA_BUNDLE="$ART/bundle" exec .venv/bin/uvicorn service.main:app --host 0.0.0.0 --port "$PORT"
else
  echo "== the prediction service is not available in this build yet; the bundle is in $ART/bundle"
fi
