"""Signature sample size against coverage, bytes and time, on encoded rows from `lma train --stream`.

Reads the rows a streaming run left in its ``--work-dir`` (``rows/``), splits them as that run
did (random split, seed, fractions), and for each sample size computes LMA's minhash signatures
from the training rows: how many tokens get one, what share of the test rows' token
occurrences they cover (the rest fall back to random placement), the table's bytes, the time.
With ``--checkpoints`` it computes nothing: it reads the signature table of each trained LMA
checkpoint (``embedding_state.npz``) and reports the same coverage beside the run's test AUC.

    python scripts/signature_sample.py WORK_DIR [--samples 125000,1000000,4000000]
        [--fractions 0.9,0.05,0.05] [--seed 0] [--checkpoints RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lma.data import random_split
from lma.data.store import EncodedStore, RowsView
from lma.signatures import SignatureTable, compute_signatures
from lma.tokens import PAD_TOKEN


def _checkpoint_row(run: Path, test: np.ndarray) -> dict[str, object]:
    with np.load(run / "embedding_state.npz", allow_pickle=False) as z:
        table = SignatureTable.from_arrays({k: z[k] for k in z.files})
    m = json.loads((run / "metrics.json").read_text())
    return {
        "run": str(run), "sample_rows": table.meta.get("n_sample_rows"),
        "signed_tokens": len(table),
        "test_occurrences_covered": float(table.contains(test).mean()),
        "signature_bytes": table.nbytes, "test_auc": m["test_auc"],
        "test_logloss": m["test_logloss"], "val_auc": m["val_auc"],
        "build_seconds": m["build_seconds"], "train_rows_per_s": m["train_rows_per_s"],
        "rows_trained": m["rows_trained_per_epoch"], "peak_rss_bytes": m.get("peak_rss_bytes"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir")
    ap.add_argument("--samples", default="125000,1000000,4000000")
    ap.add_argument("--fractions", default="0.9,0.05,0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-rows", type=int, default=200_000, help="test rows for coverage")
    ap.add_argument("--checkpoints", nargs="*", default=None,
                    help="trained LMA runs (lma train --out) on these rows: report their tables")
    args = ap.parse_args()
    store = EncodedStore(Path(args.work_dir) / "rows")
    fr = tuple(float(x) for x in args.fractions.split(","))
    tr, _, te = random_split(len(store), args.seed, fr)
    test = store.tokens(np.sort(te[: args.test_rows]))
    test = test[test != PAD_TOKEN]
    if args.checkpoints is not None:
        for run in args.checkpoints:
            print(json.dumps(_checkpoint_row(Path(run), test)), flush=True)
        store.close()
        return 0
    for n in (int(x) for x in args.samples.split(",")):
        t0 = time.perf_counter()
        # The defaults of LMA's training (set kind "rows", min count 2): one slot per field.
        table = compute_signatures(RowsView(store, tr), n_sample_rows=n,  # type: ignore[arg-type]
                                   seed=args.seed)
        sec = time.perf_counter() - t0
        print(json.dumps({
            "sample_rows": min(n, len(tr)), "train_rows": len(tr), "signed_tokens": len(table),
            "test_occurrences_covered": float(table.contains(test).mean()),
            "signature_bytes": table.nbytes, "seconds": round(sec, 1),
        }), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
