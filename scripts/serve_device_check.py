"""The service in-process on a device: answers against the CPU, where the memory lives, latency.

For each backend: the FastAPI app (``service.main``'s lifespan, settings from ``LMA_SERVE_*``)
runs in this process behind httpx's ASGI transport; the bundle's sample rows go through v2
infer (binary-free JSON tensors) and v1 raw rows; answers are checked against onnxruntime on the
CPU; the model info says where the embedding memory lives; then model latency (the backend
alone) and request latency (through the app) for 1 to 4096 rows, and device memory.

    python scripts/serve_device_check.py BUNDLE --device cuda --backends torch,onnxruntime \
        --out docs/gpu_serve_check.md

On a machine without CUDA, ``--device cpu`` runs the same checks (that is how CI-less machines
test the script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (1, 16, 128, 1024, 4096)


def _reference(bundle: Path, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    from lma.bundle import load_bundle
    from service.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(load_bundle(bundle), "cpu").run(dense, tokens)


def _rows(sample: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    reps = -(-n // len(sample["tokens"]))
    d = np.tile(sample["dense"], (reps, 1))[:n].astype(np.float32)
    t = np.tile(sample["tokens"], (reps, 1))[:n].astype(np.int64)
    return np.ascontiguousarray(d), np.ascontiguousarray(t)


def _timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _device_memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    out: dict = {}
    try:
        import torch

        out["torch_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["torch_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        out["card"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        out["torch_error"] = str(exc)
    try:
        import subprocess

        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        mine = [ln for ln in q.stdout.splitlines() if ln.split(",")[0].strip() == str(os.getpid())]
        out["nvidia_smi_this_process"] = mine
    except Exception as exc:  # noqa: BLE001
        out["nvidia_smi_error"] = str(exc)
    return out


async def check_backend(bundle: Path, backend: str, device: str, repeats: int) -> dict:
    import httpx

    os.environ.update({"LMA_SERVE_MODELS": str(bundle), "LMA_SERVE_BACKEND": backend,
                       "LMA_SERVE_DEVICE": device, "LMA_SERVE_MAX_WAIT_MS": "0",
                       "LMA_SERVE_MAX_BATCH_ROWS": "4096"})
    from service.main import create_app, lifespan

    app = create_app(lifespan)
    result: dict = {"backend": backend, "device": device}
    async with lifespan(app):
        state = app.state.lma
        t_end = time.monotonic() + 600
        while not state.registry.ready:
            if state.registry.error:
                raise RuntimeError(state.registry.error)
            if time.monotonic() > t_end:
                raise RuntimeError("not ready after 600 s")
            await asyncio.sleep(0.05)
        (model,) = state.registry.all()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            info = (await client.get(f"/v1/models/{model.name}")).json()
            result["placement"] = {k: info[k] for k in ("providers", "device", "embedding_memory")}
            sample = model.bundle.sample()
            dense, tokens = _rows(sample, 256)
            body = {"inputs": [
                {"name": "dense", "shape": list(dense.shape), "datatype": "FP32",
                 "data": dense.ravel().tolist()},
                {"name": "tokens", "shape": list(tokens.shape), "datatype": "INT64",
                 "data": tokens.ravel().tolist()}],
                "outputs": [{"name": "logits"}]}
            r = await client.post(f"/v2/models/{model.name}/infer", json=body)
            r.raise_for_status()
            got = np.asarray(r.json()["outputs"][0]["data"], np.float32)
            want = _reference(bundle, dense, tokens)
            result["max_abs_logit_diff_vs_cpu_onnxruntime"] = float(np.max(np.abs(got - want)))
            model_ms, request_ms = {}, {}
            for n in SIZES:
                d, t = _rows(sample, n)
                model_ms[n] = round(_timed(lambda d=d, t=t: model.backend.run(d, t), repeats), 3)
                b = {"inputs": [
                    {"name": "dense", "shape": list(d.shape), "datatype": "FP32",
                     "data": d.ravel().tolist()},
                    {"name": "tokens", "shape": list(t.shape), "datatype": "INT64",
                     "data": t.ravel().tolist()}]}
                times = []
                for _ in range(max(3, repeats // 4)):
                    t0 = time.perf_counter()
                    rr = await client.post(f"/v2/models/{model.name}/infer", json=b)
                    times.append(time.perf_counter() - t0)
                    rr.raise_for_status()
                request_ms[n] = round(statistics.median(times) * 1000, 3)
            result["model_ms_median"] = model_ms
            result["request_ms_median"] = request_ms
            result["device_memory"] = _device_memory(device)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = []
    for backend in args.backends.split(","):
        if backend == "onnxruntime" and args.device.startswith("cuda"):
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                results.append({"backend": backend, "device": args.device,
                                "skipped": "onnxruntime has no CUDA provider here "
                                           f"({ort.get_available_providers()})"})
                continue
        results.append(asyncio.run(check_backend(args.bundle, backend, args.device,
                                                 args.repeats)))
        print(json.dumps(results[-1]), flush=True)
    ok = all(r.get("skipped") or r["max_abs_logit_diff_vs_cpu_onnxruntime"] <= 1e-4
             for r in results)
    text = (f"# Service on {args.device}\n\nCommand: `python scripts/serve_device_check.py "
            f"{args.bundle} --device {args.device} --backends {args.backends} --repeats "
            f"{args.repeats}`; machine: {platform.node()} ({platform.machine()}).\n\n```json\n"
            + json.dumps(results, indent=2) + f"\n```\n\nAnswers match the CPU: {ok}\n")
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
