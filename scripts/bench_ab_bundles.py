"""Two bundles of the same model (e.g. exported before and after a change) timed against each
other in one process, calls interleaved (A, B, A, B, ...), so that the contention of a shared
machine falls on both alike; one engine per process, one thread.

    flock /tmp/lma-bigjob.lock taskset -c 0 python scripts/bench_ab_bundles.py \\
        --engine onnx|program BUNDLE_A BUNDLE_B [--data synth:8000:7] [--calls 400]

Engines: ``onnx`` (an onnxruntime CPU session per bundle, onnxruntime loading the weights
itself) or ``program`` (each bundle's ``model.pt2``, ``torch.export.load``). Rows come from
``--data`` (the Criteo schema by default), 8 batches per size cycled. Per row count: median
wall-clock and median thread CPU ms per call of each side, and B / A. Also checks that both
sides give bit-identical logits on every batch (``identical``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _engine(path: str, engine: str) -> Any:
    if engine == "onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(Path(path) / "model.onnx"), so,
                                    providers=["CPUExecutionProvider"])
        return lambda d, t: sess.run(None, {"dense": d, "tokens": t})[0]
    import torch

    import lma.ops  # noqa: F401  (registers the custom ops before loading)

    torch.set_num_threads(1)
    mod = torch.export.load(str(Path(path) / "model.pt2")).module()

    def run(d: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return mod(torch.from_numpy(d), torch.from_numpy(t)).numpy()

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--engine", choices=["onnx", "program"], required=True)
    ap.add_argument("--data", default="synth:8000:7")
    ap.add_argument("--rows", default="1,100,1000")
    ap.add_argument("--calls", type=int, default=400, help="calls per side and row count")
    args = ap.parse_args()
    from lma.data import open_source

    data = open_source(args.data).read_all()
    fns = {"a": _engine(args.a, args.engine), "b": _engine(args.b, args.engine)}
    out: dict[str, Any] = {"engine": args.engine, "a": args.a, "b": args.b, "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        batches = []
        for k in range(8):
            idx = (np.arange(rows) + k * rows) % len(data.tokens)
            batches.append((np.ascontiguousarray(data.dense[idx]),
                            np.ascontiguousarray(data.tokens[idx])))
        identical = all(np.array_equal(fns["a"](*x), fns["b"](*x)) for x in batches)
        for x in batches:  # warm-up
            for f in fns.values():
                f(*x)
        wall: dict[str, list[float]] = {"a": [], "b": []}
        cpu: dict[str, list[float]] = {"a": [], "b": []}
        for i in range(args.calls):
            x = batches[i % len(batches)]
            for side in (("a", "b") if i % 2 == 0 else ("b", "a")):
                t0, c0 = time.perf_counter(), time.thread_time()
                fns[side](*x)
                cpu[side].append(time.thread_time() - c0)
                wall[side].append(time.perf_counter() - t0)
        r = {s: {"ms": statistics.median(wall[s]) * 1e3, "cpu_ms": statistics.median(cpu[s]) * 1e3}
             for s in ("a", "b")}
        r["b_over_a"] = r["b"]["ms"] / r["a"]["ms"]
        r["b_over_a_cpu"] = r["b"]["cpu_ms"] / r["a"]["cpu_ms"]
        r["identical"] = bool(identical)
        out["rows"][str(rows)] = r
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
