"""Cost of reading one random training batch from an encoded store (``lma train --stream``'s
``rows/``): a memory-mapped gather, a memory-mapped gather that drops the mapping every 128
rows (MADV_DONTNEED), and one ``os.preadv`` per row into a buffer of our own (what
``EncodedStore.take`` does for scattered rows since 7ded884). Three rounds of 10 batches per
method; prints the median ms per batch of each round, then the 1-minute load average (the
numbers in docs/RESULTS.md "Peak memory against the row count" name it).

    python scripts/memprof/bench_reads.py STORE_DIR [--batch 4096]

STORE_DIR is the folder holding rows.bin and rows.json (e.g. WORK_DIR/rows). The record layout
is read from rows.json (version 1: int64 tokens, float32 dense, float32 label).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store_dir", type=Path)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = json.loads((args.store_dir / "rows.json").read_text())
    dt = np.dtype([("tokens", np.int64, (info["n_slots"],)),
                   ("dense", np.float32, (info["n_dense"],)), ("label", np.float32)])
    n, size = int(info["rows"]), dt.itemsize
    fd = os.open(args.store_dir / "rows.bin", os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    records = np.frombuffer(mm, dt, count=n)

    def mmap_plain(idx: np.ndarray) -> np.ndarray:
        return records[idx]

    def mmap_release(idx: np.ndarray, every: int = 128) -> np.ndarray:
        out = np.empty(len(idx), dt)
        for a in range(0, len(idx), every):
            out[a : a + every] = records[idx[a : a + every]]
            mm.madvise(mmap.MADV_DONTNEED)
        return out

    def pread(idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(idx), dt)
        view = memoryview(out.view(np.uint8))
        for i, offset in enumerate((idx * size).tolist()):
            os.preadv(fd, [view[i * size : (i + 1) * size]], offset)
        return out

    methods: list[Callable[[np.ndarray], np.ndarray]] = [mmap_plain, mmap_release, pread]
    rng = np.random.default_rng(args.seed)
    res: dict[str, list[float]] = {}
    for _ in range(3):
        for f in methods:
            times = []
            for _ in range(10):
                idx = rng.integers(0, n, args.batch)
                t = time.perf_counter()
                f(idx)
                times.append(time.perf_counter() - t)
            res.setdefault(f.__name__, []).append(round(float(np.median(times)) * 1e3, 1))
    print(json.dumps({"batch": args.batch, "median_ms_per_round": res,
                      "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
