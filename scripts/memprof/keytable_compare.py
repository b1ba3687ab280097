"""Compare two versions of ``build_key_table`` (two copies of lma/hashspec.py, e.g. from
checkouts of two commits): the same table on a vocabulary, duplicate, extreme, empty, single
and random key sets, and the peak traced memory per key (tracemalloc), time and table bytes per
key of each. Exits non-zero if any table differs. docs/RESULTS.md "Full-table training peak at
the Kaggle vocabulary" used it to show d99be0f's leaner build output-identical to the one
before, on the 4.84M-token vocabulary of ``runs/streammem/new-4m``. With ``--lookups`` (two
table layouts, e.g. key table v2 against v3) the tables may differ; each must then answer every
key, absent key and extreme key as a binary search over the keys does.

    python scripts/memprof/keytable_compare.py [--lookups] OLD/lma/hashspec.py \\
        NEW/lma/hashspec.py FEATURE_MAP_DIR|random:N
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


def _array(table: object) -> np.ndarray:
    """A table's one array, whatever its layout (v3 ``rows``, v2 ``buckets``)."""
    return table.rows if hasattr(table, "rows") else table.buckets  # type: ignore[attr-defined]


def _search(keys: np.ndarray, values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The first value of each query in keys (left binary search of a stable sort), else -1."""
    if len(keys) == 0:
        return np.full(len(q), -1, np.int64)
    order = np.argsort(keys, kind="stable")
    sk, sv = keys[order], values[order]
    pos = np.minimum(np.searchsorted(sk, q), len(sk) - 1)
    return np.where(sk[pos] == q, sv[pos], -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("feature_map_dir", help="a feature map folder, or random:N for N random keys")
    ap.add_argument("--lookups", action="store_true",
                    help="layouts differ: check answers against a binary search, not identity")
    args = ap.parse_args()
    versions = [load_module(args.old, "hashspec_old"), load_module(args.new, "hashspec_new")]
    rng = np.random.default_rng(0)
    if args.feature_map_dir.startswith("random:"):
        n = int(args.feature_map_dir.split(":", 1)[1])
        vocab = np.unique(rng.integers(I64.min, I64.max, n, dtype=np.int64))
    else:
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
        if args.lookups:
            q = np.concatenate([keys, rng.integers(I64.min, I64.max, 100_000),
                                [I64.min, -1, 0, 1, I64.max]]).astype(np.int64)
            want = _search(np.asarray(keys, np.int64), np.asarray(values, np.int64), q)
            same = all(np.array_equal(m.key_table_lookup(t, q, -1), want)
                       for m, (t, _, _) in zip(versions, res, strict=True))
        else:
            same = a.n_keys == b.n_keys and np.array_equal(_array(a), _array(b))
        ok &= same
        n = max(len(keys), 1)
        what = "answers as a binary search" if args.lookups else "identical"
        print(f"{name:14s} {what}={same} n={len(keys)} peak old {res[0][1] / n:.0f} B/key "
              f"new {res[1][1] / n:.0f} B/key  time {res[0][2]:.2f}/{res[1][2]:.2f} s  table "
              f"{_array(a).nbytes / n:.1f}/{_array(b).nbytes / n:.1f} B/key")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
