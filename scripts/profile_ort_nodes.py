"""onnxruntime's own node profile of one exported ``scripts/bench_model.py`` variant: the time
per operator type over 48 calls of 1000 rows (one thread), for the whole model or the key
resolution alone.

    taskset -c 0 python scripts/profile_ort_nodes.py BENCH_OUT VARIANT [model|resolve] [nodes] [native]
    # e.g. /tmp/bench_model lma16/hot resolve      (``nodes``: per node instead of per type;
    # ``native``: with the onnxruntime LMA ops library registered, lma.ort_ops)
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main() -> int:
    import bench_model as bm
    import onnxruntime as ort

    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, name = Path(sys.argv[1]), sys.argv[2]
    part = sys.argv[3] if len(sys.argv) > 3 else "model"
    by_node = "nodes" in sys.argv[4:]
    native = "native" in sys.argv[4:]
    fmap = bm._fmap(out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    if native:
        from lma import ort_ops

        ort_ops.add_to(so)
    sess = ort.InferenceSession(str(out / name.replace("/", "_") / f"{part}.onnx"), so,
                                providers=["CPUExecutionProvider"])
    batches = bm._batches(fmap, 1000, 1100)
    calls = 48
    for i in range(calls):
        b = batches[i % len(batches)]
        sess.run(None, {"dense": b[0], "tokens": b[1]} if part == "model" else {"tokens": b[1]})
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    os.remove(prof)
    per_op: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    total = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            if by_node:
                op = f"{op} {e['name'].removesuffix('_kernel_time')}"
            per_op[op] += e["dur"]
            nodes[op] += 1
        if e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"]
    sys.stdout.write(f"{name} {part}{' (native ops)' if native else ''}: mean run {total / calls / 1e3:.3f} ms\n\n"
                     "| op | ms per call | share of run | nodes |\n|---|---|---|---|\n")
    for op, d in per_op.most_common(30 if by_node else 20):
        sys.stdout.write(f"| {op} | {d / calls / 1e3:.3f} | {d / max(total, 1):.0%} | "
                         f"{nodes[op] // calls} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
