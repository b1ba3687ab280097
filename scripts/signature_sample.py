"""Signature sample size against coverage, bytes and time, on encoded rows from `lma train --stream`.

Reads the rows a streaming run left in its ``--work-dir`` (``rows/``), splits them as that run
did (random split, seed, fractions), and for each sample size computes LMA's minhash signatures
from the training rows: how many tokens get one, what share of the test rows' token
occurrences they cover (the rest fall back to random placement), the table's bytes, the time.

    python scripts/signature_sample.py WORK_DIR [--samples 125000,1000000,4000000]
        [--fractions 0.9,0.05,0.05] [--seed 0]
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
from lma.signatures import compute_signatures
from lma.tokens import PAD_TOKEN


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir")
    ap.add_argument("--samples", default="125000,1000000,4000000")
    ap.add_argument("--fractions", default="0.9,0.05,0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-rows", type=int, default=200_000, help="test rows for coverage")
    args = ap.parse_args()
    store = EncodedStore(Path(args.work_dir) / "rows")
    fr = tuple(float(x) for x in args.fractions.split(","))
    tr, _, te = random_split(len(store), args.seed, fr)
    test = store.take(np.sort(te[: args.test_rows])).tokens
    test = test[test != PAD_TOKEN]
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
