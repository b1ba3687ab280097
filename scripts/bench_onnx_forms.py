"""CPU onnxruntime latency of forms of the lookup ONNX functions, in one run.

    flock /tmp/lma-bigjob.lock python scripts/bench_onnx_forms.py [--old-rev REV] [--rounds 2]
    flock /tmp/lma-bigjob.lock python scripts/bench_onnx_forms.py --bench hot [--rounds 2]
    flock /tmp/lma-bigjob.lock python scripts/bench_onnx_forms.py --bench keylookup --old-rev REV

``--bench hashed`` (default): two forms of the HashedGather function, ``model_export/onnx_op.py``
at git revision ``--old-rev`` (default: the last revision with the BitShift / int64-MatMul body)
against the working tree's. ``--bench hot``: the working tree's HotGather function (the hot
serving form: ``--hot-rows`` precomputed rows, default 107,000, the signed tokens of the Kaggle
vocabulary at the default signature sample) at 0%, 12% and 100% cold entries against its
HashedGather function on the same keys (``--dtype float16``: both tables in float16); hot entries
pick a row uniformly (no locality, so the rows' reads are as uncached as they get). ``--bench keylookup``: the KeyLookup function at
``--old-rev`` against the working tree's, over key tables of ``--table-keys`` random keys
(default 107,000 and 4,000,000), queries 88% present keys, 12% absent.

Each measurement runs in its own process (one onnxruntime engine per process), pinned to one core
(``taskset -c 0``) with one intra-op thread; forms alternate over ``--rounds`` rounds so that
drift of a shared machine hits both alike. Standalone models: one node, 26 keys per row; lookups
d = 16, M = 2^25 floats (LMA 16x at the Kaggle vocabulary), Z = 4 unaligned for ``hot``, keys
random. Prints markdown tables of the median ms per call, wall-clock and thread CPU time (min
over rounds of the per-process medians; CPU time leaves out time the scheduler gave other
processes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "030ad3e"
ROWS = [1, 100, 1000]
CASES = [("lma", 1), ("lma", 4), ("lma", 16), ("robez", 1), ("robez", 16)]
COLD = [0.0, 0.12, 1.0]
ABSENT = 0.12  # share of absent keys in key-lookup queries (unsigned tokens)


def _load(module_path: str) -> ModuleType:
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("onnx_op_form", module_path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(sess: Any, pools: dict[int, list[dict[str, np.ndarray]]]) -> dict[str, float]:
    """Median wall and thread-CPU ms per call for each batch size, cycling through 8 feeds."""
    out = {}
    for rows, pool in pools.items():
        for feed in pool:
            sess.run(None, feed)
        n = max(20, min(400, int(2000 / rows)))
        times, cpu = [], []
        for i in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            sess.run(None, pool[i % len(pool)])
            cpu.append(time.thread_time() - c0)
            times.append(time.perf_counter() - t0)
        out[f"wall/{rows}"] = statistics.median(times) * 1e3
        out[f"cpu/{rows}"] = statistics.median(cpu) * 1e3
    return out


def _random_keys(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-(1 << 63), (1 << 63) - 1, shape, dtype=np.int64)


def _worker_hashed(module_path: str, mode: str, z: int, log2m: int) -> dict[str, float]:
    from lma.ops.reference import HashedGatherConfig

    mod = _load(module_path)
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=False, m=1 << log2m, seed=1)
    mem = np.random.default_rng(0).standard_normal(cfg.m).astype(np.float32)
    sess = _session(mod.standalone_model(cfg, memory=mem))
    rng = np.random.default_rng(1)
    return _time(sess, {r: [{"keys": _random_keys(rng, (r, 26))} for _ in range(8)] for r in ROWS})


def _worker_hot(form: str, cold: float, log2m: int, hot_rows: int,
                dtype: str) -> dict[str, float]:
    from lma.ops.reference import HashedGatherConfig

    mod = _load(str(REPO / "model_export" / "onnx_op.py"))
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=1 << log2m, seed=1)
    rng = np.random.default_rng(0)
    mem = rng.standard_normal(cfg.m).astype(dtype)
    if form == "hashed":
        sess = _session(mod.standalone_model(cfg, memory=mem))
    else:
        hot = rng.standard_normal((hot_rows, 16)).astype(dtype)
        sess = _session(mod.hot_standalone_model(cfg, mem, hot))
    pools: dict[int, list[dict[str, np.ndarray]]] = {}
    for r in ROWS:
        pools[r] = []
        for _ in range(8):
            keys = _random_keys(rng, (r, 26))
            index = rng.integers(0, hot_rows, (r, 26)).astype(np.int64)
            index[rng.random((r, 26)) < cold] = -1
            pools[r].append({"keys": keys} if form == "hashed" else {"index": index, "keys": keys})
    return _time(sess, pools)


def _worker_keylookup(module_path: str, table_path: str) -> dict[str, float]:
    from lma import hashspec

    mod = _load(module_path)
    data = np.load(table_path)
    table = hashspec.KeyTable(rows=data["rows"], n_keys=int(data["n_keys"]))
    keys = data["keys"]
    sess = _session(mod.key_lookup_model(table, default_shape=[1]))
    rng = np.random.default_rng(1)
    pools: dict[int, list[dict[str, np.ndarray]]] = {}
    default = np.array([-1], np.int64)
    for r in ROWS:
        pools[r] = []
        for _ in range(8):
            q = rng.choice(keys, (r, 26))
            absent = rng.random((r, 26)) < ABSENT
            q[absent] = _random_keys(rng, (int(absent.sum()),))
            pools[r].append({"keys": q, "default": default})
    return _time(sess, pools)


def _run(args: argparse.Namespace, *worker: str) -> dict[str, float]:
    cmd = ["taskset", "-c", "0", sys.executable, __file__, "--log2m", str(args.log2m),
           "--hot-rows", str(args.hot_rows), "--dtype", args.dtype, "--worker", *worker]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _old_module(rev: str) -> str:
    tmp = Path(tempfile.mkdtemp())
    old = tmp / "onnx_op_old.py"
    old.write_text(subprocess.run(["git", "show", f"{rev}:model_export/onnx_op.py"], cwd=REPO,
                                  check=True, capture_output=True, text=True).stdout)
    return str(old)


def _keep_min(best: dict[tuple[Any, ...], float], key: tuple[Any, ...], res: dict[str, float]) -> None:
    for what, ms in res.items():
        k = (*key, what)
        best[k] = min(best.get(k, float("inf")), ms)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def bench_hashed(args: argparse.Namespace) -> str:
    forms = {"old": _old_module(args.old_rev), "new": str(REPO / "model_export" / "onnx_op.py")}
    best: dict[tuple[Any, ...], float] = {}
    for _ in range(args.rounds):
        for mode, z in CASES:
            for form, path in forms.items():
                _keep_min(best, (form, mode, z), _run(args, "hashed", path, mode, str(z)))
    rows = []
    for mode, z in CASES:
        for r in ROWS:
            o, n = best[("old", mode, z, f"wall/{r}")], best[("new", mode, z, f"wall/{r}")]
            oc, nc = best[("old", mode, z, f"cpu/{r}")], best[("new", mode, z, f"cpu/{r}")]
            rows.append([mode, str(z), str(r), f"{o:.3f}", f"{n:.3f}", f"{n / o:.2f}",
                         f"{oc:.3f}", f"{nc:.3f}", f"{nc / oc:.2f}"])
    return _table(["mode", "Z", "rows", f"old ms ({args.old_rev})", "new ms", "new / old",
                   "old CPU ms", "new CPU ms", "new / old (CPU)"], rows)


def bench_hot(args: argparse.Namespace) -> str:
    runs = [("hashed", 0.0)] + [("hot", c) for c in COLD]
    best: dict[tuple[Any, ...], float] = {}
    for _ in range(args.rounds):
        for form, cold in runs:
            _keep_min(best, (form, cold), _run(args, "hot", form, str(cold)))
    rows = []
    for r in ROWS:
        h, hc = best[("hashed", 0.0, f"wall/{r}")], best[("hashed", 0.0, f"cpu/{r}")]
        cells = [str(r), f"{h:.3f} ({hc:.3f})"]
        for cold in COLD:
            w, c = best[("hot", cold, f"wall/{r}")], best[("hot", cold, f"cpu/{r}")]
            cells.append(f"{w:.3f} ({c:.3f}) = {w / h:.2f}x")
        rows.append(cells)
    return _table(["rows", "HashedGather ms (CPU ms)",
                   *[f"HotGather, {c:.0%} cold: ms (CPU ms) = x HashedGather" for c in COLD]], rows)


def bench_keylookup(args: argparse.Namespace) -> str:
    from lma import hashspec

    forms = {"old": _old_module(args.old_rev), "new": str(REPO / "model_export" / "onnx_op.py")}
    tmp = Path(tempfile.mkdtemp())
    tables = {}
    for n in args.table_keys:
        keys = _random_keys(np.random.default_rng(n), (n,))
        t = hashspec.build_key_table(keys, np.arange(n, dtype=np.int64))
        tables[n] = tmp / f"table_{n}.npz"
        np.savez(tables[n], rows=t.rows, n_keys=t.n_keys, keys=keys)
        del t, keys
    best: dict[tuple[Any, ...], float] = {}
    for _ in range(args.rounds):
        for n, path in tables.items():
            for form, mod in forms.items():
                _keep_min(best, (form, n), _run(args, "keylookup", mod, str(path)))
    rows = []
    for n in tables:
        for r in ROWS:
            o, w = best[("old", n, f"wall/{r}")], best[("new", n, f"wall/{r}")]
            oc, nc = best[("old", n, f"cpu/{r}")], best[("new", n, f"cpu/{r}")]
            rows.append([f"{n:,}", str(r), f"{o:.3f}", f"{w:.3f}", f"{w / o:.2f}", f"{oc:.3f}",
                         f"{nc:.3f}", f"{nc / oc:.2f}"])
    return _table(["table keys", "rows", f"old ms ({args.old_rev})", "new ms", "new / old",
                   "old CPU ms", "new CPU ms", "new / old (CPU)"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bench", choices=["hashed", "hot", "keylookup"], default="hashed")
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--log2m", type=int, default=25)
    ap.add_argument("--hot-rows", type=int, default=107_000)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                    help="--bench hot: the memory's and hot rows' dtype")
    ap.add_argument("--table-keys", type=int, nargs="+", default=[107_000, 4_000_000])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "hashed":
            res = _worker_hashed(rest[0], rest[1], int(rest[2]), args.log2m)
        elif kind == "hot":
            res = _worker_hot(rest[0], float(rest[1]), args.log2m, args.hot_rows, args.dtype)
        else:
            res = _worker_keylookup(rest[0], rest[1])
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    bench = {"hashed": bench_hashed, "hot": bench_hot, "keylookup": bench_keylookup}[args.bench]
    sys.stdout.write(bench(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
