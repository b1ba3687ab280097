"""Resident memory of `lma serve --workers N` per worker, for the bundles given.

For each bundle and each N: start `lma serve BUNDLE --workers N`, wait until ready, send
requests whose tokens are drawn from the model's vocabulary (so the weights that serving touches
are resident, not just mapped), then read every worker process's RSS and USS (private memory,
which N workers pay N times) with psutil. Writes a markdown table.

    python scripts/serve_memory.py BUNDLE [BUNDLE...] --workers 1,2,4 --out docs/bench/serve_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Traffic:
    """Rows to send: from a data source (``--data``, the realistic choice: the training
    distribution), else tokens drawn from the bundle's vocabulary counts when it has them
    (format 1), else the bundle's sample rows."""

    def __init__(self, bundle: Path, data: str | None, rng: np.random.Generator):
        self.rng = rng
        self.dense = self.tokens = None
        self.vocab = None
        if data:
            from lma.data import open_source

            d = open_source(data).read_all()
            self.dense = np.ascontiguousarray(d.dense, np.float32)
            self.tokens = np.ascontiguousarray(d.tokens, np.int64)
            return
        npz = bundle / "feature_map.npz"
        if npz.is_file():
            info = json.loads((bundle / "feature_map.json").read_text())
            with np.load(npz) as z:
                self.vocab = [z[f"tokens_{i}"] for i in range(len(info["schema"]["categorical"]))]
            self.n_dense = len(info["schema"]["dense"])
            return
        with np.load(bundle / "sample.npz") as z:
            self.dense, self.tokens = z["dense"].astype(np.float32), z["tokens"].astype(np.int64)

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.vocab is not None:
            tokens = np.stack([v[self.rng.integers(0, len(v), n)] if len(v) else np.ones(n, np.int64)
                               for v in self.vocab], axis=1).astype(np.int64)
            dense = np.abs(self.rng.standard_normal((n, self.n_dense))).astype(np.float32)
            return dense, tokens
        idx = self.rng.integers(0, len(self.tokens), n)
        return self.dense[idx], self.tokens[idx]


def measure(bundle: Path, workers: int, requests_n: int, rows: int, data: str | None) -> dict:
    name = json.loads((bundle / "manifest.json").read_text())["model"]["name"]
    port = _port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lma.cli", "-q", "serve", str(bundle), "--port", str(port),
         "--workers", str(workers), "--threads", "1", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 600
        while time.monotonic() < t_end:
            if proc.poll() is not None:
                raise RuntimeError(f"{bundle}: the server exited: {proc.stderr.read()[-2000:]!r}")
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{bundle}: not ready")
        time.sleep(2.0 * workers)  # let every worker finish loading and warming
        traffic = Traffic(bundle, data, np.random.default_rng(0))
        for _ in range(requests_n):
            d, t = traffic.rows(rows)
            body = {"inputs": [
                {"name": "dense", "shape": list(d.shape), "datatype": "FP32",
                 "data": d.ravel().tolist()},
                {"name": "tokens", "shape": list(t.shape), "datatype": "INT64",
                 "data": t.ravel().tolist()}]}
            with requests.Session() as s:  # a new connection each time: spread over workers
                r = s.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)
            r.raise_for_status()
        time.sleep(1.0)
        parent = psutil.Process(proc.pid)
        # uvicorn's workers are spawned processes; leave out multiprocessing's resource tracker.
        kids = [k for k in parent.children(recursive=True)
                if "spawn_main" in " ".join(k.cmdline())]
        others = [k for k in parent.children(recursive=True) if k not in kids]
        procs = kids if workers > 1 else [parent]
        rss = [p.memory_info().rss for p in procs]
        full = [p.memory_full_info() for p in procs]
        uss = [m.uss for m in full]
        pss = [m.pss for m in full]
        helpers = [parent, *others] if workers > 1 else []
        supervisor = sum(k.memory_info().rss for k in helpers)
        supervisor_pss = sum(k.memory_full_info().pss for k in helpers)
        return {"bundle": str(bundle), "model": name, "workers": workers,
                "rss_per_worker_mb": [round(x / 2**20, 1) for x in rss],
                "uss_per_worker_mb": [round(x / 2**20, 1) for x in uss],
                "supervisor_rss_mb": round(supervisor / 2**20, 1),
                "total_rss_mb": round((sum(rss) + supervisor) / 2**20, 1),
                # PSS splits shared pages (libraries, memory-mapped weights) among the
                # processes that map them: its sum is what the server really occupies.
                "total_pss_mb": round((sum(pss) + supervisor_pss) / 2**20, 1)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--requests", type=int, default=40, help="requests per measurement")
    ap.add_argument("--rows", type=int, default=1000, help="rows per request")
    ap.add_argument("--data", default=None,
                    help="rows to send (a --data spec, e.g. the training distribution)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = []
    for b in args.bundles:
        from lma.bundle import load_bundle

        bundle = load_bundle(b)
        comp = bundle.component_bytes()
        for n in (int(x) for x in args.workers.split(",")):
            r = measure(b, n, args.requests, args.rows, args.data)
            r["kind"] = bundle.kind
            r["format"] = bundle.manifest.get("bundle_format")
            r["model_mb"] = round(comp["total"] / 2**20, 1)
            r["embedding_mb"] = round(comp["embedding"] / 2**20, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    lines = [
        "# Resident memory per `lma serve` worker",
        "",
        f"Command: `python scripts/serve_memory.py {' '.join(map(str, args.bundles))} "
        f"--workers {args.workers} --requests {args.requests} --rows {args.rows}"
        + (f" --data {args.data}" if args.data else "") + "`; machine: "
        f"{platform.machine()} Linux, shared 2-core machine (contended), onnxruntime CPU, one "
        "intra-op thread. Memory read after the requests (rows of --data, else tokens drawn "
        "from the model's vocabulary). USS is a worker's private memory: what each additional worker costs; total "
        "PSS (shared pages split among the processes mapping them) is what the server occupies.",
        "",
        "| model | kind | bundle format | model bytes (MB) | workers | RSS per worker (MB) "
        "| USS per worker (MB) | total RSS (MB) | total PSS (MB) |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['format']} | {r['model_mb']} | {r['workers']} | "
            f"{', '.join(map(str, r['rss_per_worker_mb']))} | "
            f"{', '.join(map(str, r['uss_per_worker_mb']))} | {r['total_rss_mb']} | "
            f"{r['total_pss_mb']} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
