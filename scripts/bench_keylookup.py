"""Time two versions of the ONNX ``ai.lma::KeyLookup`` function on one key-resolution model.

Takes a key-resolution model (``resolve.onnx`` as ``scripts/bench_model.py`` exports it: one
KeyLookup node over the model's key table) and two copies of ``model_export/onnx_op.py`` (e.g.
from checkouts of two commits); writes the model once with each version's function body, checks
that both give the same output on the benchmark's token draws, and times each in its own process
(pinned to core 0, one thread), alternating for ``--rounds`` rounds. Prints a table (median ms at
``--rows`` rows per round, ratio new / old within each round) and writes it as JSON to ``--out``.

    python scripts/bench_keylookup.py OLD/model_export/onnx_op.py model_export/onnx_op.py \\
        /tmp/bench_model/full_table/resolve.onnx --feature-map /tmp/bench_model/feature_map
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def _tokens(feature_map: str, rows: int) -> list[np.ndarray]:
    import bench_model

    from lma.features import FeatureMap

    return [b[1] for b in bench_model._batches(FeatureMap.load(feature_map), rows, 0)]


def _time(model: str, tokens_npz: str, calls: int) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = [{"tokens": t} for t in np.load(tokens_npz).values()]
    for i in range(max(20, calls // 10)):
        sess.run(None, feeds[i % len(feeds)])
    wall, cpu = [], []
    for i in range(calls):
        t0, c0 = time.perf_counter(), time.thread_time()
        sess.run(None, feeds[i % len(feeds)])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return {"ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        res = _time(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("model", help="a key-resolution model (one KeyLookup node)")
    ap.add_argument("--feature-map", required=True, help="the bench's feature map (token draws)")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from memprof.keytable_compare import load_module

    work = Path(tempfile.mkdtemp(prefix="bench_keylookup_"))
    tokens = _tokens(args.feature_map, args.rows)
    tok_path = work / "tokens.npz"
    np.savez(tok_path, *tokens)
    model = onnx.load(args.model)  # once: only its KeyLookup function differs between versions
    paths, outputs = {}, {}
    for tag, src in (("old", args.old), ("new", args.new)):
        mod = load_module(src, f"onnx_op_{tag}")
        keep = [f for f in model.functions if f.name != mod.KEY_LOOKUP_OP_TYPE]
        del model.functions[:]
        model.functions.extend([*keep, mod.key_lookup_function()])
        paths[tag] = work / f"{tag}.onnx"
        onnx.save(model, str(paths[tag]))
        n_nodes = len(model.functions[-1].node)
        sess = ort.InferenceSession(str(paths[tag]), providers=["CPUExecutionProvider"])
        outputs[tag] = [sess.run(None, {"tokens": t})[0] for t in tokens]
        del sess
        print(f"{tag}: {src} ({n_nodes} nodes in KeyLookup)", flush=True)
    del model
    same = all(np.array_equal(a, b) for a, b in zip(outputs["old"], outputs["new"], strict=True))
    print(f"outputs identical on {len(tokens)} batches of {args.rows} rows: {same}", flush=True)
    if not same:
        return 1
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        row = {}
        for tag in ("old", "new") if r % 2 == 0 else ("new", "old"):
            cmd = ["taskset", "-c", "0", sys.executable, __file__, "--worker", str(paths[tag]),
                   str(tok_path), str(args.calls)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            row[tag], row[tag + "_cpu"] = got["ms"], got["cpu_ms"]
        rounds.append(row)
        print(f"round {r + 1}/{args.rounds}: old {row['old']:.3f} ms, new {row['new']:.3f} ms, "
              f"new/old {row['new'] / row['old']:.2f} (CPU time {row['old_cpu']:.3f}, "
              f"{row['new_cpu']:.3f}: {row['new_cpu'] / row['old_cpu']:.2f})", flush=True)
    old = statistics.median(r["old"] for r in rounds)
    new = statistics.median(r["new"] for r in rounds)
    ratio = statistics.median(r["new"] / r["old"] for r in rounds)
    cpu = {t: statistics.median(r[t + "_cpu"] for r in rounds) for t in ("old", "new")}
    cpu_ratio = statistics.median(r["new_cpu"] / r["old_cpu"] for r in rounds)
    print(f"\n| version | median ms at {args.rows} rows (wall) | CPU ms |\n|---|---|---|\n"
          f"| old | {old:.3f} | {cpu['old']:.3f} |\n| new | {new:.3f} | {cpu['new']:.3f} |\n"
          f"| new / old (median of rounds) | {ratio:.2f} | {cpu_ratio:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "rows": args.rows,
                                              "rounds": rounds, "old_ms": old, "new_ms": new,
                                              "ratio": ratio, "cpu_ms": cpu,
                                              "cpu_ratio": cpu_ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
