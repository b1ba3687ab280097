"""Weights in private memory or memory-mapped: latency and resident memory per bundle, engine and
mode (``Predictor.open(weights="private" | "mmap")``), one process per cell.

    flock /tmp/lma-bigjob.lock python scripts/bench_weights.py --bundle full=DIR --bundle lma=DIR \\
        [--engines onnx,eager] [--rounds 2] [--data synth:8000:3:kaggle] --out results.json

Every cell runs in its own process pinned to core 0 (``taskset -c 0``) with one thread: open
the bundle (checksums trusted by the verified-once marker), warm up (``Predictor.warmup`` and two
passes over the batches), then median wall-clock and thread CPU ms per call at 1, 100 and 1000
rows (8 batches per size from ``--data``, cycled). Resident memory from ``/proc/self/status``
after the timing: RSS, its anonymous (private) and file-backed (mapped) parts, and the peak.
Cells alternate modes (private, mmap, private, ...) within each round, so drift in the machine's
load falls on both. Writes ``--out`` (JSON) and prints a markdown table (minimum over rounds of
each cell's medians; RSS from the last round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROWS = (1, 100, 1000)


def _status() -> dict[str, float]:
    """Resident memory (MB), and how much of it is mapped with 2 MB pages: anonymous huge
    pages (private weights) and page-cache large folios mapped by PMD (mapped weights)."""
    out = {}
    for f, keys in (("status", ("VmRSS", "RssAnon", "RssFile", "VmHWM")),
                    ("smaps_rollup", ("AnonHugePages", "FilePmdMapped"))):
        for line in Path(f"/proc/self/{f}").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) / 1024
    return out


def cell(bundle: str, engine: str, mode: str, data: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from lma.data import open_source
    from lma.predictor import Predictor

    rows = open_source(data).read_all()
    t0 = time.perf_counter()
    p = Predictor.open(bundle, engine=engine, intra_op_threads=1, weights=mode)
    open_s = time.perf_counter() - t0
    p.warmup(256)
    res: dict[str, Any] = {"open_s": open_s, "weights": p.weights, "ms": {}, "cpu_ms": {}}
    for n in ROWS:
        batches = []
        for k in range(8):
            idx = (np.arange(n) + k * n) % len(rows.tokens)
            batches.append((rows.dense[idx], rows.tokens[idx]))
        for _ in range(2):
            for b in batches:
                p.logits(*b)
        once = time.perf_counter()
        p.logits(*batches[0])
        once = time.perf_counter() - once
        calls = int(max(30, min(400, 2.0 / max(once, 1e-6))))
        wall, cpu = [], []
        for i in range(calls):
            b = batches[i % len(batches)]
            t0, c0 = time.perf_counter(), time.thread_time()
            p.logits(*b)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
        res["ms"][str(n)] = statistics.median(wall) * 1e3
        res["cpu_ms"][str(n)] = statistics.median(cpu) * 1e3
    res["memory_mb"] = _status()
    return res


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--cell":
        sys.stdout.write(json.dumps(cell(*sys.argv[2:6])) + "\n")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--engines", default="onnx,eager")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default="synth:8000:3:kaggle")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    bundles = dict(b.split("=", 1) for b in args.bundle)
    results: dict[str, Any] = {"meta": {"start": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "load_avg": [], "data": args.data}, "cells": []}
    for r in range(args.rounds):
        for name, path in bundles.items():
            for engine in args.engines.split(","):
                modes = ("private", "mmap") if r % 2 == 0 else ("mmap", "private")
                for mode in modes:
                    results["meta"]["load_avg"].append(
                        float(Path("/proc/loadavg").read_text().split()[0]))
                    cmd = ["taskset", "-c", "0", sys.executable, __file__, "--cell", path,
                           engine, mode, args.data]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    c: dict[str, Any] = {"round": r, "bundle": name, "engine": engine,
                                         "mode": mode}
                    if p.returncode != 0:
                        c["error"] = p.stderr[-2000:]
                    else:
                        c.update(json.loads(p.stdout.strip().splitlines()[-1]))
                    results["cells"].append(c)
                    Path(args.out).write_text(json.dumps(results, indent=1))
                    sys.stderr.write(f"{name} {engine} {mode}: {c.get('ms', c.get('error'))}\n")
    results["meta"]["end"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).write_text(json.dumps(results, indent=1))
    sys.stdout.write(report(results))
    return 0


def report(results: dict[str, Any]) -> str:
    lines = ["| bundle | engine | weights | 1 row ms | 100 rows ms | 1000 rows ms | CPU ms at 1000 "
             "| RSS MB (anon + file) | in 2 MB pages MB | peak RSS MB | open s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((c["bundle"], c["engine"], c["mode"]) for c in results["cells"])
    for b, e, m in keys:
        cs = [c for c in results["cells"] if (c["bundle"], c["engine"], c["mode"]) == (b, e, m)
              and "ms" in c]
        if not cs:
            lines.append(f"| {b} | {e} | {m} | error | | | | | | | |")
            continue
        ms = {n: min(c["ms"][n] for c in cs) for n in ("1", "100", "1000")}
        cpu = min(c["cpu_ms"]["1000"] for c in cs)
        mem = cs[-1]["memory_mb"]
        lines.append(f"| {b} | {e} | {m} | {ms['1']:.3f} | {ms['100']:.2f} | {ms['1000']:.2f} | "
                     f"{cpu:.2f} | {mem['VmRSS']:.0f} ({mem['RssAnon']:.0f} + {mem['RssFile']:.0f})"
                     f" | {mem.get('AnonHugePages', 0) + mem.get('FilePmdMapped', 0):.0f}"
                     f" | {mem['VmHWM']:.0f} | {min(c['open_s'] for c in cs):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
