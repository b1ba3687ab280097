"""Service latency at low load: end-to-end and server-side p50/p99 with a stage breakdown.

    flock /tmp/lma-bigjob.lock python scripts/bench_latency.py --bundle artifacts/bundle

Starts the real server (``uvicorn`` on ``service.main:app``, wrapped by scripts/latency_app.py for
a ``Server-Timing`` breakdown) once per backend and batcher setting, then sends one request at a
time over one keep-alive connection: 1-, 100- and 1000-candidate requests built from the real
Criteo sample rows (``$LMA_SHARED_DATA``), as

- ``v1 json``: the ranking form, ``{"context": {dense fields, C1-C5}, "candidates": [{C6-C26}]}``;
- ``v2 raw``: the Open Inference Protocol with binary tensors, one BYTES tensor per field;
- ``v2 encoded``: binary ``dense`` FP32 [B, 13] and ``tokens`` INT64 [B, 26] (no encoding in the
  server).

The in-process model time is the same backend's ``run`` on the same rows in this process (one
thread, pinned to the server's core). Server and client are pinned to different cores; the model
gets one intra-op thread (``LMA_SERVE_THREADS=1``). Without ``--bundle``, a quick-start model is
trained and exported first (``--train-rows`` synthetic rows, 1 epoch: the architecture of
``make serve``'s model, fewer training rows). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZES = (1, 100, 1000)
FORMS = ("v1 json", "v2 raw", "v2 encoded")
STAGES = ("body", "parse", "encode", "queue", "compute", "score", "response")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(n: int) -> list[dict[str, Any]]:
    """The first n rows of the real Criteo sample as a client sends them (no label, ints as
    numbers, empty cells left out)."""
    from lma.data import data_root, open_source

    path = data_root() / "criteo" / "train_10k.tsv"
    table, _ = next(open_source(f"criteo:{path}", chunk_rows=n).iter_tables())
    out = []
    for r in table.to_pylist():
        row: dict[str, Any] = {}
        for k, v in r.items():
            if k == "label" or v == "":
                continue
            row[k] = int(v) if k.startswith("I") else v
        out.append(row)
    return out


def _bytes_tensor(values: list[str]) -> bytes:
    parts = []
    for v in values:
        b = v.encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def _v2_body(inputs: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, int]:
    header = {
        "inputs": [
            {"name": n, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(b)}}
            for n, dt, shape, b in inputs
        ],
        "outputs": [{"name": "probability", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    return head + b"".join(b for *_, b in inputs), len(head)


def _requests(schema: Any, rows: list[dict[str, Any]]) -> dict[str, tuple[str, bytes, dict]]:
    """Path, body and headers of each request form for these rows."""
    from lma.records import encode_records

    n = len(rows)
    ctx_names = [*schema.dense_names, *[f"C{i}" for i in range(1, 6)]]
    context = {k: v for k, v in rows[0].items() if k in ctx_names}
    cands = [{k: v for k, v in r.items() if k not in ctx_names} for r in rows]
    v1 = json.dumps({"context": context, "candidates": cands}).encode()
    merged = [{**c, **context} for c in cands]
    raw_inputs = []
    for f in [*schema.dense_names, *schema.categorical_names]:
        vals = ["" if r.get(f) is None else str(r[f]) for r in merged]
        raw_inputs.append((f, "BYTES", [n], _bytes_tensor(vals)))
    raw, raw_len = _v2_body(raw_inputs)
    enc = encode_records(schema, merged)
    dense = np.ascontiguousarray(enc.dense, dtype="<f4")
    tokens = np.ascontiguousarray(enc.tokens, dtype="<i8")
    encoded, enc_len = _v2_body(
        [
            ("dense", "FP32", list(dense.shape), dense.tobytes()),
            ("tokens", "INT64", list(tokens.shape), tokens.tobytes()),
        ]
    )
    octet = "application/octet-stream"
    return {
        "v1 json": ("/v1/models/{m}:predict", v1, {"Content-Type": "application/json"}),
        "v2 raw": (
            "/v2/models/{m}/infer",
            raw,
            {"Content-Type": octet, "Inference-Header-Content-Length": str(raw_len)},
        ),
        "v2 encoded": (
            "/v2/models/{m}/infer",
            encoded,
            {"Content-Type": octet, "Inference-Header-Content-Length": str(enc_len)},
        ),
    }, merged


def _probabilities(form: str, body: bytes, headers: dict[str, str]) -> np.ndarray:
    if form == "v1 json":
        return np.array(json.loads(body)["predictions"])
    head = int(headers["inference-header-content-length"])
    return np.frombuffer(body[head:], dtype="<f4").astype(np.float64)


def _pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.array(a) * 1e3, q))


def _start_server(bundle: Path, backend: str, wait_ms: float, cpu: int | None) -> tuple[Any, int]:
    port = _free_port()
    env = {
        **os.environ,
        "LMA_SERVE_MODELS": str(bundle),
        "LMA_SERVE_BACKEND": backend,
        "LMA_SERVE_THREADS": "1",
        "LMA_SERVE_MAX_WAIT_MS": str(wait_ms),
        "LMA_SERVE_VERIFY_CHECKSUMS": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "latency_app:app",
        "--app-dir",
        str(REPO / "scripts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, preexec_fn=preexec)  # noqa: PLW1509
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready in 300 s")


def _model_time(
    bundle: Path,
    backend: str,
    merged: dict[int, list[dict[str, Any]]],
    schema: Any,
    reps: dict[int, int],
) -> dict[int, list[float]]:
    from lma.records import encode_records
    from model_export.bundle import load_bundle
    from service.backends import open_backend

    b = open_backend(backend, load_bundle(bundle), "cpu", threads=1)
    out: dict[int, list[float]] = {}
    try:
        for n, rows in merged.items():
            enc = encode_records(schema, rows)
            for _ in range(10):
                b.run(enc.dense, enc.tokens)
            ts = []
            for _ in range(reps[n]):
                t = time.perf_counter()
                b.run(enc.dense, enc.tokens)
                ts.append(time.perf_counter() - t)
            out[n] = ts
    finally:
        b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", default=None, help="bundle folder (default: train a quick-start one)"
    )
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--wait-ms", default="2,0", help="LMA_SERVE_MAX_WAIT_MS values to run")
    ap.add_argument("--requests", type=int, default=300, help="requests per cell (1000 rows: /3)")
    ap.add_argument("--train-rows", type=int, default=50000)
    ap.add_argument("--out", default=None, help="also write the tables to this file")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[-1]) if len(cpus) > 1 else (None, None)
    if args.bundle is None:
        tmp = Path(tempfile.mkdtemp(prefix="lma-latency-"))
        lma = [sys.executable, "-m", "lma.cli"]
        subprocess.run(
            [
                *lma,
                "train",
                "--data",
                f"synth:{args.train_rows}:0",
                "--embedding",
                "lma",
                "--compression",
                "16",
                "--epochs",
                "1",
                "--batch-size",
                "1024",
                "--out",
                str(tmp / "model"),
            ],
            check=True,
            cwd=REPO,
        )
        subprocess.run(
            [*lma, "export", str(tmp / "model"), "--out", str(tmp / "bundle"), "--name", "ctr"],
            check=True,
            cwd=REPO,
        )
        bundle = tmp / "bundle"
    else:
        bundle = Path(args.bundle).resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    model_name = manifest["model"]["name"]
    from lma.schema import Schema

    schema = Schema.from_dict(json.loads((bundle / "feature_map.json").read_text())["schema"])
    all_rows = _rows(max(SIZES))
    requests: dict[int, dict[str, tuple[str, bytes, dict]]] = {}
    merged: dict[int, list[dict[str, Any]]] = {}
    for n in SIZES:
        requests[n], merged[n] = _requests(schema, all_rows[:n])
    reps = {n: args.requests if n < 1000 else max(args.requests // 3, 20) for n in SIZES}

    lines = [
        f"Service latency at low load (one request at a time, one keep-alive connection); bundle "
        f"`{bundle}` ({manifest['embedding']['kind']}, "
        f"{manifest['embedding']['config'].get('n_params', '?')} embedding parameters); server pinned "
        f"to cpu {server_cpu}, client to cpu {client_cpu}; {platform.machine()}, "
        f"{os.cpu_count()} cores; {reps[1]} requests per cell ({reps[1000]} at 1000 rows). "
        "Times in ms.",
        "",
    ]
    for backend in args.backends.split(","):
        if server_cpu is not None:
            os.sched_setaffinity(0, {server_cpu})
        model = _model_time(bundle, backend, merged, schema, reps)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        for wait in [float(w) for w in args.wait_ms.split(",")]:
            proc, port = _start_server(bundle, backend, wait, server_cpu)
            try:
                lines += _run_cell(
                    backend, wait, port, model_name, requests, merged, model, reps, schema, bundle
                )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _run_cell(
    backend: str,
    wait: float,
    port: int,
    model_name: str,
    requests: dict[int, dict[str, tuple[str, bytes, dict]]],
    merged: dict[int, list[dict[str, Any]]],
    model: dict[int, list[float]],
    reps: dict[int, int],
    schema: Any,
    bundle: Path,
) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = [
        f"**{backend}**, `LMA_SERVE_MAX_WAIT_MS={wait:g}`",
        "",
        "| form | rows | end-to-end p50 / p99 | server p50 / p99 | body | parse | encode | queue "
        "| compute | score | response | other | model in-process p50 | (e2e - model) / model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in SIZES:
        ref = None
        for form in FORMS:
            path, body, headers = requests[n][form]
            path = path.format(m=model_name)
            e2e: list[float] = []
            server: dict[str, list[float]] = {}
            for i in range(reps[n] + 10):
                t = time.perf_counter()
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t
                if resp.status != 200:
                    raise SystemExit(f"{form} {n} rows: HTTP {resp.status}: {data[:300]!r}")
                if i == 0:
                    probs = _probabilities(form, data, {k.lower(): v for k, v in resp.getheaders()})
                    if ref is None:
                        ref = probs
                    elif not np.allclose(probs, ref, atol=1e-6):
                        raise SystemExit(f"{form} {n} rows: answers differ from v1 json")
                if i < 10:
                    continue
                e2e.append(dt)
                for item in resp.getheader("server-timing", "").split(","):
                    name, _, dur = item.strip().partition(";dur=")
                    if dur:
                        server.setdefault(name, []).append(float(dur) / 1e3)
            total = server["total"]
            staged = [
                sum(
                    server.get(k, [0.0] * len(total))[j]
                    for k in ("body", "parse", "encode", "score", "response")
                )
                for j in range(len(total))
            ]
            other = [t - s for t, s in zip(total, staged, strict=True)]
            med = {k: (_pct(v, 50) if v else float("nan")) for k, v in server.items()}
            mp50 = _pct(model[n], 50)
            ratio = (_pct(e2e, 50) - mp50) / mp50
            cells = [f"{med.get(k, float('nan')):.3f}" for k in STAGES]
            out.append(
                f"| {form} | {n} | {_pct(e2e, 50):.3f} / {_pct(e2e, 99):.3f} | "
                f"{_pct(total, 50):.3f} / {_pct(total, 99):.3f} | "
                + " | ".join(cells)
                + f" | {_pct(other, 50):.3f} | {mp50:.3f} | {ratio:.2f} |"
            )
    conn.close()
    out.append("")
    return out


if __name__ == "__main__":
    main()
