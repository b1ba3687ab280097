"""GPU check: every node of the HashedGather, HotGather and KeyLookup functions (and of any bundles given) runs on
onnxruntime's CUDA EP, with answers equal to the CPU EP's.

Run on a machine with onnxruntime-gpu (the CPU wheel has no CUDA EP; the script then says SKIP and
exits 0):

    python scripts/gpu_ort_placement.py [BUNDLE_DIR ...]

For each model it creates a session with only the CUDA EP, ``session.disable_cpu_ep_fallback=1``
(creation fails if any node would fall back to the CPU) and
``session.record_ep_graph_assignment_info=1``, lists the nodes per EP from
``get_provider_graph_assignment_info()``, and compares outputs with a CPU-EP session on keys that
include INT64 min/max, 0, 1 and -1: slot indices bit for bit, gathered values exactly. Exit code 1
when any check fails. The static counterpart, run in CI, is tests/test_onnx_cuda_kernels.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXTREME = [0, 1, -1, -(1 << 63), (1 << 63) - 1, -(1 << 63) + 1, 0xFFFF, 1 << 32]


def _keys(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.integers(-(1 << 63), (1 << 63) - 1, size=shape, dtype=np.int64, endpoint=True)
    k.reshape(-1)[: len(EXTREME)] = EXTREME
    return k


TARGET = "CUDAExecutionProvider"


def _session(ort, model_bytes_or_path, cuda: bool):  # noqa: ANN001, ANN202
    so = ort.SessionOptions()
    if cuda:
        if TARGET != "CPUExecutionProvider":  # ORT refuses the option with the CPU EP listed
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        providers = [TARGET]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(model_bytes_or_path, so, providers=providers)


def _placement(sess) -> dict[str, list[str]]:  # noqa: ANN001
    out: dict[str, list[str]] = {}
    for sub in sess.get_provider_graph_assignment_info():
        out.setdefault(sub.ep_name, []).extend(f"{n.op_type}:{n.name}" for n in sub.get_nodes())
    return out


def check(ort, name: str, model, feeds: dict[str, np.ndarray]) -> bool:  # noqa: ANN001
    try:
        gpu = _session(ort, model, cuda=True)
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        print(f"FAIL {name}: CUDA-only session refused ({type(exc).__name__}: {str(exc)[:500]})")
        return False
    placed = _placement(gpu)
    off = {ep: nodes for ep, nodes in placed.items() if ep != TARGET}
    counts = {ep: len(v) for ep, v in placed.items()}
    cpu = _session(ort, model, cuda=False)
    ok = not off
    for (g,), (c,) in [(gpu.run(None, feeds), cpu.run(None, feeds))]:
        same = g.dtype == c.dtype and g.shape == c.shape and np.array_equal(g, c)
        ok = ok and same
        print(f"{'ok  ' if ok else 'FAIL'} {name}: nodes per EP {counts}; output {g.dtype}{g.shape} "
              f"{'equal to' if same else 'DIFFERS from'} CPU EP"
              + (f"; not on CUDA: {off}" if off else ""))
    return ok


def main() -> int:
    global TARGET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundles", nargs="*", help="bundle folders whose model.onnx to check too")
    ap.add_argument("--ep", default=TARGET,
                    help="target EP (CPUExecutionProvider: a dry run of the script's own logic)")
    args = ap.parse_args()
    TARGET = args.ep
    import onnxruntime as ort

    avail = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}; providers {avail}")
    if TARGET not in avail:
        print(f"SKIP: no {TARGET} here (install onnxruntime-gpu on a CUDA machine)")
        return 0
    from lma.ops import HashedGatherConfig
    from model_export import onnx_op

    ok = True
    for mode in ("lma", "robez"):
        for z, aligned in ((1, False), (4, True), (16, False)):
            cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=(1 << 20) + 7, seed=5)
            keys = _keys((257, 26), seed=z)
            mem = np.random.default_rng(0).standard_normal(cfg.m).astype(np.float32)
            for indices_only in (True, False):
                model = onnx_op.standalone_model(cfg, memory=mem, indices_only=indices_only)
                what = "indices" if indices_only else "gather"
                ok &= check(ort, f"HashedGather {mode} Z={z} aligned={aligned} {what}",
                            model.SerializeToString(), {"keys": keys})
    rng = np.random.default_rng(2)
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=(1 << 20) + 7, seed=5)
    for dtype in (np.float32, np.float16):
        mem = rng.standard_normal(cfg.m).astype(dtype)
        for h in (0, 5000):
            hot = rng.standard_normal((h, 16)).astype(dtype)
            model = onnx_op.hot_standalone_model(cfg, mem, hot).SerializeToString()
            for cold in (0.0, 0.12, 1.0):
                index = rng.integers(0, max(h, 1), (257, 26)).astype(np.int64)
                index[(rng.random(index.shape) < cold) | (h == 0)] = -1
                share = float((index < 0).mean())
                ok &= check(ort, f"HotGather {np.dtype(dtype).name} H={h} cold={share:.0%}", model,
                            {"index": index, "keys": _keys((257, 26), seed=h)})
    from lma import hashspec

    rng = np.random.default_rng(1)
    for n in (0, 1000, 200_000):
        vocab = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64, endpoint=True)
        vocab[: min(n, 2)] = [-(1 << 63), (1 << 63) - 1][: min(n, 2)]
        table = hashspec.build_key_table(vocab, rng.integers(0, 1 << 40, n, dtype=np.int64))
        keys = np.concatenate([vocab[:4000], _keys((40, 26), seed=n).reshape(-1)])
        keys = keys[: len(keys) - len(keys) % 26].reshape(-1, 26)
        model = onnx_op.key_lookup_model(table)
        ok &= check(ort, f"KeyLookup over {n} keys", model.SerializeToString(),
                    {"keys": keys, "default": np.full_like(keys, -1)})
    for b in args.bundles:
        path = Path(b) / "model.onnx"
        sample = np.load(Path(b) / "sample.npz")
        feeds = {"dense": sample["dense"].astype(np.float32), "tokens": sample["tokens"].astype(np.int64)}
        try:
            gpu = _session(ort, str(path), cuda=True)
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL bundle {b}: CUDA-only session refused ({str(exc)[:500]})")
            ok = False
            continue
        placed = _placement(gpu)
        (g,) = gpu.run(None, feeds)
        (c,) = _session(ort, str(path), cuda=False).run(None, feeds)
        diff = float(np.max(np.abs(g - c))) if g.size else 0.0
        off = {ep: v for ep, v in placed.items() if ep != TARGET}
        good = not off and diff <= 1e-5
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} bundle {b}: nodes per EP "
              f"{ {ep: len(v) for ep, v in placed.items()} }; max |GPU - CPU| logit {diff:.2e}"
              + (f"; not on CUDA: {off}" if off else ""))
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
