"""Compare two versions of ``build_key_table`` (two copies of lma/hashspec.py, e.g. from
checkouts of two commits): the same buckets on a vocabulary, duplicate, extreme, empty, single
and random key sets, and the peak traced memory per key (tracemalloc) and time of each. Exits
non-zero if any table differs. docs/RESULTS.md "Full-table training peak at the Kaggle
vocabulary" used it to show d99be0f's leaner build output-identical to the one before, on the
4.84M-token vocabulary of ``runs/streammem/new-4m``.

    python scripts/memprof/keytable_compare.py OLD/lma/hashspec.py NEW/lma/hashspec.py \\
        FEATURE_MAP_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import tracemalloc
from types import ModuleType

import numpy as np

from lma.features import FeatureMap

I64 = np.iinfo(np.int64)


def load_module(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("feature_map_dir")
    args = ap.parse_args()
    versions = [load_module(args.old, "hashspec_old"), load_module(args.new, "hashspec_new")]
    rng = np.random.default_rng(0)
    fm = FeatureMap.load(args.feature_map_dir)
    vocab = np.sort(np.concatenate(fm.vocab(1)))
    del fm
    cases = {
        "vocab": (vocab, np.arange(len(vocab))),
        "dups unsorted": (rng.integers(-50, 50, 1000), rng.integers(0, 1 << 40, 1000)),
        "extreme": (np.array([I64.min, -1, 0, 1, I64.max] * 3), np.arange(15)),
        "empty": (np.zeros(0, np.int64), np.zeros(0, np.int64)),
        "one": (np.array([42]), np.array([7])),
        "random 300k": (rng.integers(I64.min, I64.max, 300_000), rng.integers(0, 9, 300_000)),
    }
    ok = True
    for name, (keys, values) in cases.items():
        res = []
        for m in versions:
            tracemalloc.start()
            t = time.perf_counter()
            table = m.build_key_table(keys, values)
            sec = time.perf_counter() - t
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            res.append((table, peak, sec))
        a, b = res[0][0], res[1][0]
        same = a.n_keys == b.n_keys and np.array_equal(a.rows, b.rows)
        ok &= same
        n = max(len(keys), 1)
        print(f"{name:14s} identical={same} n={len(keys)} peak old {res[0][1] / n:.0f} B/key "
              f"new {res[1][1] / n:.0f} B/key  time {res[0][2]:.2f}/{res[1][2]:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
