"""Test AUC of exported bundles on their checkpoint's own test split, so that a float16-table
bundle is measured, not credited with its float32 checkpoint's metric.

    python scripts/fp16_auc.py --data criteo:../shared/data/criteo/train_10k.tsv \
        CHECKPOINT=BUNDLE [CHECKPOINT=BUNDLE ...]

Prints one JSON line per bundle: rows, AUC of the bundle's onnxruntime scores, and the metric
the checkpoint recorded (equal for a float32 bundle of that checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lma.checkpoint import load_checkpoint
from lma.data import open_source, take
from lma.metrics import roc_auc
from lma.predictor import Predictor
from lma.train import split_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the checkpoints' training data (lma --data)")
    ap.add_argument("pairs", nargs="+", metavar="CHECKPOINT=BUNDLE")
    a = ap.parse_args(argv)
    data = open_source(a.data).read_all()
    for pair in a.pairs:
        ck_dir, _, bundle = pair.partition("=")
        ck = load_checkpoint(Path(ck_dir))
        tc = ck.config.get("train_config", {})
        parts = split_rows(tc.get("split", "random"), len(data), tc.get("seed", 0),
                           tuple(tc.get("fractions", (0.8, 0.1, 0.1))), data.times, a.data)
        test = take(data, parts[2])
        p = Predictor.open(bundle).predict(test.dense, test.tokens)
        sys.stdout.write(json.dumps({"bundle": bundle, "rows": len(p),
                                     "test_auc": roc_auc(test.labels, p),
                                     "checkpoint_test_auc": ck.metrics.get("test_auc")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
