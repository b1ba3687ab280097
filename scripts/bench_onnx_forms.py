"""CPU onnxruntime latency of two forms of the HashedGather ONNX function, in one run.

    flock /tmp/lma-bigjob.lock python scripts/bench_onnx_forms.py [--old-rev REV] [--rounds 2]

The old form is ``model_export/onnx_op.py`` at git revision ``--old-rev`` (default: the last
revision with the BitShift / int64-MatMul body), the new one is the working tree's. Each
measurement runs in its own process (one onnxruntime engine per process), pinned to one core
(``taskset -c 0``) with one intra-op thread; forms alternate over ``--rounds`` rounds so that
drift of a shared machine hits both alike. Standalone model: one HashedGather node, 26 keys per
row, d = 16, M = 2^25 floats (LMA 16x at the Kaggle vocabulary), keys random. Prints a markdown
table of the median ms per call, wall-clock and thread CPU time (min over rounds of the
per-process medians; CPU time leaves out time the scheduler gave other processes).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "030ad3e"
ROWS = [1, 100, 1000]
CASES = [("lma", 1), ("lma", 4), ("lma", 16), ("robez", 1), ("robez", 16)]


def _worker(module_path: str, mode: str, z: int, log2m: int) -> None:
    sys.path.insert(0, str(REPO))
    import onnxruntime as ort

    from lma.ops.reference import HashedGatherConfig

    spec = importlib.util.spec_from_file_location("onnx_op_form", module_path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=False, m=1 << log2m, seed=1)
    mem = np.random.default_rng(0).standard_normal(cfg.m).astype(np.float32)
    model = mod.standalone_model(cfg, memory=mem)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    out = {}
    for rows in ROWS:
        pool = [rng.integers(-(1 << 63), (1 << 63) - 1, (rows, 26), dtype=np.int64) for _ in range(8)]
        for k in pool:
            sess.run(None, {"keys": k})
        n = max(20, min(400, int(2000 / rows)))
        times, cpu = [], []
        for i in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            sess.run(None, {"keys": pool[i % 8]})
            cpu.append(time.thread_time() - c0)
            times.append(time.perf_counter() - t0)
        out[f"wall/{rows}"] = statistics.median(times) * 1e3
        out[f"cpu/{rows}"] = statistics.median(cpu) * 1e3
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--log2m", type=int, default=25)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], int(args.worker[2]), args.log2m)
        return 0
    tmp = Path(tempfile.mkdtemp())
    old = tmp / "onnx_op_old.py"
    old.write_text(subprocess.run(["git", "show", f"{args.old_rev}:model_export/onnx_op.py"],
                                  cwd=REPO, check=True, capture_output=True, text=True).stdout)
    forms = {"old": str(old), "new": str(REPO / "model_export" / "onnx_op.py")}
    best: dict[tuple[str, str, int, str], float] = {}
    for _ in range(args.rounds):
        for mode, z in CASES:
            for form, path in forms.items():
                cmd = ["taskset", "-c", "0", sys.executable, __file__, "--log2m", str(args.log2m),
                       "--worker", path, mode, str(z)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                text=True).stdout.strip().splitlines()[-1])
                for what, ms in res.items():
                    key = (form, mode, z, what)
                    best[key] = min(best.get(key, float("inf")), ms)
    lines = [f"| mode | Z | rows | old ms ({args.old_rev}) | new ms | new / old | old CPU ms | "
             "new CPU ms | new / old (CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, z in CASES:
        for rows in ROWS:
            o, n = best[("old", mode, z, f"wall/{rows}")], best[("new", mode, z, f"wall/{rows}")]
            oc, nc = best[("old", mode, z, f"cpu/{rows}")], best[("new", mode, z, f"cpu/{rows}")]
            lines.append(f"| {mode} | {z} | {rows} | {o:.3f} | {n:.3f} | {n / o:.2f} | {oc:.3f} | "
                         f"{nc:.3f} | {nc / oc:.2f} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
