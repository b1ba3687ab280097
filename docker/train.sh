#!/usr/bin/env bash
# Train a model, export it and add it to a model repository as the next numbered version:
#   lma-train-bundle REPOSITORY [NAME]      (the `train` image's entry point)
# Settings (environment): LMA_TRAIN_DATA (a --data spec; default synthetic Criteo-schema rows,
# synth:$LMA_TRAIN_ROWS:$LMA_TRAIN_SEED), LMA_TRAIN_EMBEDDING, LMA_TRAIN_COMPRESSION,
# LMA_TRAIN_EPOCHS, LMA_TRAIN_BATCH_SIZE, LMA_TRAIN_ARGS (extra `lma train` options).
set -euo pipefail
REPO=${1:?usage: lma-train-bundle REPOSITORY [NAME]}
NAME=${2:-demo}
ROWS=${LMA_TRAIN_ROWS:-200000}
DATA=${LMA_TRAIN_DATA:-synth:${ROWS}:${LMA_TRAIN_SEED:-0}}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$REPO/$NAME"
last=0
for d in "$REPO/$NAME"/*/; do
  v=$(basename "$d")
  if [[ "$v" =~ ^[0-9]+$ ]] && (( v > last )); then last=$v; fi
done
VERSION=$((last + 1))

echo "== training on $DATA"
# LMA_TRAIN_ARGS is split into words on purpose: it carries several options.
# shellcheck disable=SC2086
lma train --data "$DATA" --embedding "${LMA_TRAIN_EMBEDDING:-lma}" \
  --compression "${LMA_TRAIN_COMPRESSION:-16}" --epochs "${LMA_TRAIN_EPOCHS:-2}" \
  --batch-size "${LMA_TRAIN_BATCH_SIZE:-1024}" ${LMA_TRAIN_ARGS:-} --out "$WORK/model"
echo "== exporting and verifying"
lma export "$WORK/model" --out "$WORK/bundle"
lma verify "$WORK/bundle"
# A rename inside one file system is atomic: a server scanning the repository never sees half
# a bundle.
mkdir -p "$REPO/$NAME/.incoming"
cp -r "$WORK/bundle" "$REPO/$NAME/.incoming/$VERSION"
mv "$REPO/$NAME/.incoming/$VERSION" "$REPO/$NAME/$VERSION"
rmdir "$REPO/$NAME/.incoming" 2>/dev/null || true
echo "== $REPO/$NAME/$VERSION"
