"""Cost of the feature-store round trip measured through the service: entity requests against the
same requests carrying the features inline, 1 and 100 candidates.

    flock /tmp/lma-bigjob.lock python scripts/bench_feature_store_service.py [--repo DIR]

Starts a local ``redis-server``, loads the real Avazu sample with entity ``device_id``, trains
and exports a small LMA model on the same sample (unless ``--repo`` names a model repository
holding ``avazu_lma``), serves it with one uvicorn worker (``REDIS_URL`` set) and sends, one at a
time over one keep-alive connection, four ranking requests per candidate count, interleaved:

- inline context: the user's stored row as ``context``, candidates naming an app each;
- request entity: the same with ``"entities": {"device_id": USER}`` instead of the context;
- inline candidates: each candidate its own device's stored row and an app;
- candidate entities: the same with each candidate's ``"entities": {"device_id": D}``.

Each entity request's answer is checked against its inline twin. Prints a markdown table of
client-side latency (ms), the p50 difference (the feature store's cost per request), and the
server's own time in the store call per request (``lma_feature_store_seconds``, read from
``/metrics`` around each entity request, outside its timing).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tests.service_fixtures import REDIS_SERVER, RedisServer, free_port  # noqa: E402

MODEL = "avazu_lma"
SIZES = (1, 100)


def _latest(path: Path) -> dict[str, dict[str, str]]:
    out: dict[str, tuple[int, dict[str, str]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            d = row["device_id"]
            if d and (d not in out or int(row["hour"]) >= out[d][0]):
                out[d] = (int(row["hour"]), {k: v for k, v in row.items()
                                             if k not in ("id", "click")})
    return {d: r for d, (_, r) in out.items()}


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lma.cli", "-q", *args], check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL)


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not come up in {timeout} s")


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, dict]:
    t = time.perf_counter()
    conn.request("POST", f"/v1/models/{MODEL}:predict", body,
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    dt = time.perf_counter() - t
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {data[:300]!r}")
    return dt, json.loads(data)


def _store_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the server's lma_feature_store_seconds histogram."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("lma_feature_store_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lma_feature_store_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=None, help="model repository holding avazu_lma/1")
    ap.add_argument("--reps", type=int, default=300, help="requests per kind and size")
    args = ap.parse_args()
    if REDIS_SERVER is None:
        raise SystemExit("redis-server is not installed")
    from lma.data import data_root

    avazu = data_root() / "avazu" / "train_9999.csv"
    work = Path(tempfile.mkdtemp(prefix="bench_fs_"))
    procs: list[subprocess.Popen] = []
    redis_server = None
    try:
        repo = Path(args.repo) if args.repo else work / "repo"
        if args.repo is None:
            _run("train", "--data", f"avazu:{avazu}", "--embedding", "lma", "--compression", "16",
                 "--epochs", "1", "--threads", "1", "--out", str(work / "run"))
            _run("export", str(work / "run"), "--out", str(repo / MODEL / "1"), "--name", MODEL)
        redis_server = RedisServer().start()
        url = redis_server.url
        _run("features", "load", "--data", f"avazu:{avazu}", "--entity", "device_id",
             "--redis", url, "--quiet")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMA_SERVE_")}
        env |= {"LMA_SERVE_MODELS": str(repo), "REDIS_URL": url, "LMA_SERVE_THREADS": "1"}
        log = open(work / "server.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

        def ready() -> bool:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/health/ready")
            resp = c.getresponse()
            body = json.loads(resp.read() or b"{}")
            if body.get("error"):
                raise SystemExit(f"the server cannot serve the model: {body['error']}")
            return resp.status == 200

        def ready_or_exit() -> bool:
            if procs[-1].poll() is not None:
                raise SystemExit(f"the server exited:\n{(work / 'server.log').read_text()}")
            return ready()

        _wait(ready_or_exit, "the server")
        latest = _latest(avazu)
        devices = [d for d in sorted(latest) if d != "a99f214a"]
        apps = sorted({r["app_id"] for r in latest.values()})
        user = devices[0]
        kinds: dict[int, dict[str, bytes]] = {}
        for n in SIZES:
            cand_apps = [apps[i % len(apps)] for i in range(n)]
            devs = devices[1:n + 1]
            kinds[n] = {k: json.dumps(v).encode() for k, v in {
                "inline context": {"context": latest[user],
                                   "candidates": [{"app_id": a} for a in cand_apps]},
                "request entity": {"entities": {"device_id": user},
                                   "candidates": [{"app_id": a} for a in cand_apps]},
                "inline candidates": {"candidates": [{**latest[d], "app_id": a}
                                                     for d, a in zip(devs, cand_apps, strict=True)]},
                "candidate entities": {"candidates": [{"entities": {"device_id": d}, "app_id": a}
                                                      for d, a in zip(devs, cand_apps,
                                                                      strict=True)]},
            }.items()}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times: dict[tuple[int, str], list[float]] = {}
        store: dict[tuple[int, str], list[float]] = {}  # server-side store call per request
        for n, bodies in kinds.items():
            answers = {k: _post(conn, b)[1] for k, b in bodies.items()}
            for a, b in (("request entity", "inline context"),
                         ("candidate entities", "inline candidates")):
                if answers[a]["predictions"] != answers[b]["predictions"] or "warnings" in answers[a]:
                    raise SystemExit(f"{n} candidates: {a} answers differ from {b}")
            for _ in range(20):
                for b in bodies.values():
                    _post(conn, b)
            for _ in range(args.reps):
                for k, b in bodies.items():
                    before = _store_seconds(port) if "entit" in k else None
                    times.setdefault((n, k), []).append(_post(conn, b)[0])
                    if before is not None:
                        after = _store_seconds(port)
                        if after[1] - before[1] != 1:
                            raise SystemExit(f"{k}: {after[1] - before[1]} store calls, not 1")
                        store.setdefault((n, k), []).append(after[0] - before[0])
        print(f"Feature store through the service: one uvicorn worker (onnxruntime, 1 thread), "
              f"local redis-server, {args.reps} requests per kind and size, one at a time, "
              f"interleaved; {os.cpu_count()} cores. Client-side latency in ms.")
        print()
        print("| candidates | features | inline p50 / p99 | entities p50 / p99 | entities - inline, "
              "p50 | store call in the server, p50 / p99 |")
        print("|---|---|---|---|---|---|")
        for n in SIZES:
            for label, a, b in (("request's (1 key)", "request entity", "inline context"),
                                (f"per candidate ({n} key{'s' if n > 1 else ''})",
                                 "candidate entities", "inline candidates")):
                e = np.array(times[(n, a)]) * 1e3
                i = np.array(times[(n, b)]) * 1e3
                f = np.array(store[(n, a)]) * 1e3
                print(f"| {n} | {label} | {np.percentile(i, 50):.3f} / {np.percentile(i, 99):.3f} "
                      f"| {np.percentile(e, 50):.3f} / {np.percentile(e, 99):.3f} "
                      f"| {np.percentile(e, 50) - np.percentile(i, 50):+.3f} "
                      f"| {np.percentile(f, 50):.3f} / {np.percentile(f, 99):.3f} |")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if redis_server is not None:
            redis_server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
