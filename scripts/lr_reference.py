"""Logistic-regression reference on hashed one-hot features, same splits as `lma train`.

    python scripts/lr_reference.py --data criteo:../shared/data/criteo/train_10k.tsv --seeds 0,1,2,3,4

Features: one-hot of every categorical token, hashed into 2^20 columns (token hash mod 2^20), plus
the schema's transformed dense features standardised on the training rows. The inverse
regularisation C is chosen per seed on the validation split from a small grid; test AUC is
reported for that C. Needs scikit-learn (the `dev` extra).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from lma.data import open_source, random_split, take
from lma.metrics import roc_auc

N_BUCKETS = 1 << 20


def design(enc, mean, std):
    n, s = enc.tokens.shape
    cols = np.remainder(enc.tokens, N_BUCKETS).ravel()
    rows = np.repeat(np.arange(n), s)
    onehot = sparse.csr_matrix((np.ones(n * s), (rows, cols)), shape=(n, N_BUCKETS))
    dense = sparse.csr_matrix((enc.dense - mean) / std)
    return sparse.hstack([onehot, dense]).tocsr()


C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def lr_reference(data_spec: str, seeds: list[int], schema: str | None = None) -> list[dict]:
    """Per seed: the C chosen on validation, its validation and test AUC."""
    data = open_source(data_spec, schema).read_all()
    out = []
    for seed in seeds:
        tr, va, te = (take(data, i) for i in random_split(len(data), seed))
        mean = tr.dense.mean(0) if tr.dense.shape[1] else 0.0
        std = tr.dense.std(0) + 1e-6 if tr.dense.shape[1] else 1.0
        xtr, xva, xte = (design(e, mean, std) for e in (tr, va, te))
        best = None
        for c in C_GRID:
            m = LogisticRegression(C=c, max_iter=2000).fit(xtr, tr.labels)
            v = roc_auc(va.labels, m.decision_function(xva))
            if best is None or v > best[0]:
                best = (v, c, roc_auc(te.labels, m.decision_function(xte)))
        out.append({"seed": seed, "C": best[1], "val_auc": best[0], "test_auc": best[2]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--schema", default=None)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args()
    out = lr_reference(args.data, [int(s) for s in args.seeds.split(",")], args.schema)
    for r in out:
        print(json.dumps(r))
    print(json.dumps({"mean_test_auc": float(np.mean([r["test_auc"] for r in out]))}))


if __name__ == "__main__":
    main()
