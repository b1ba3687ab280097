#!/usr/bin/env bash
# Model latency at the Kaggle vocabulary, before (a git revision) and after (this tree), in one
# run: scripts/bench_model.py of THIS tree drives both (so the harness is the same), variant by
# variant, the revision's side first; both sides share one prepared feature map.
#
#   flock /tmp/lma-bigjob.lock scripts/bench_model_ab.sh REV OUT [VARIANTS]
#
# REV: e.g. d57942c (main before the ortfast ONNX changes). OUT gets before/ and after/ (each
# with results.json and results.md, bench_model's layout). VARIANTS: bench_model variant names,
# default "lma16/table full/table robez16"; FMAP_ROWS=N for a smaller vocabulary (smoke tests). Peak memory ~7 GB (the full model's export); the
# full model's files take ~3.6 GB per side under OUT.
set -euo pipefail
REV=$1
OUT=$(realpath -m "$2")
VARIANTS=${3:-"lma16/table full/table robez16"}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
TREE=$OUT/tree-$REV
mkdir -p "$OUT/before" "$OUT/after"
if [ ! -d "$TREE" ]; then
  mkdir -p "$TREE"
  git -C "$HERE" archive "$REV" | tar -x -C "$TREE"
  (cd "$TREE" && "$PY" -m lma.ops.build --quiet)
fi
cp "$HERE/scripts/bench_model.py" "$TREE/scripts/bench_model.py"
echo "start $(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg)"
(cd "$HERE" && "$PY" scripts/bench_model.py --out "$OUT/after" --only none --export-only \
  ${FMAP_ROWS:+--fmap-rows "$FMAP_ROWS"} >/dev/null)
ln -sfn "$OUT/after/feature_map" "$OUT/before/feature_map"
ln -sfn "$OUT/after/signatures.npz" "$OUT/before/signatures.npz"
for v in $VARIANTS; do
  (cd "$TREE" && "$PY" scripts/bench_model.py --out "$OUT/before" --only "$v" >/dev/null)
  (cd "$HERE" && "$PY" scripts/bench_model.py --out "$OUT/after" --only "$v" >/dev/null)
  echo "$v done $(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "before: $OUT/before/results.md  after: $OUT/after/results.md"
