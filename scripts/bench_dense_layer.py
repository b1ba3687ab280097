"""The DLRM's largest dense layer alone, torch against onnxruntime: the top MLP's first Linear
(367 -> 64 for 26 fields at d = 16) on 1000 rows, one thread, each engine in its own process
pinned to one core, median ms over 300 calls; 3 rounds alternating the engines.

    python scripts/bench_dense_layer.py [--rows 1000] [--cpu 0]

torch's CPU wheel does its float32 matmuls with MKL, onnxruntime with its own MLAS kernels; on
some CPUs (MKL's generic code path on AMD, for one) the two differ by ~2x, and in a small model
such as this DLRM that layer is a fixed cost of every model kind, whatever its embedding.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IN, OUT, CALLS = 367, 64, 300


def _time(fn) -> float:  # noqa: ANN001
    for _ in range(20):
        fn()
    ts = []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def worker(engine: str, rows: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, IN)).astype(np.float32)
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    b = rng.standard_normal(OUT).astype(np.float32)
    if engine == "torch":
        import torch

        torch.set_num_threads(1)
        lin = torch.nn.Linear(IN, OUT)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            return _time(lambda: lin(xt))
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", OUT])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return _time(lambda: sess.run(None, {"x": x}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--worker", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.stdout.write(f"{worker(args.worker, args.rows)}\n")
        return 0
    res: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for _ in range(3):
        for engine in res:
            out = subprocess.run(["taskset", "-c", str(args.cpu), sys.executable, __file__,
                                  "--worker", engine, "--rows", str(args.rows)],
                                 capture_output=True, text=True, check=True)
            res[engine].append(float(out.stdout.strip().splitlines()[-1]))
    sys.stdout.write(f"Linear {IN} -> {OUT} on {args.rows} rows, one thread (median ms per "
                     "call; 3 rounds):\n\n| engine | rounds | median |\n|---|---|---|\n")
    for engine, ts in res.items():
        sys.stdout.write(f"| {engine} | {', '.join(f'{t:.3f}' for t in ts)} | "
                         f"{statistics.median(ts):.3f} |\n")
    ratio = statistics.median(res["torch"]) / statistics.median(res["onnxruntime"])
    sys.stdout.write(f"\ntorch / onnxruntime: {ratio:.2f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
