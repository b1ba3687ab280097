"""Cost of one feature-store round trip per batch: FeatureStore.fetch of 1, 100, 1000 entities.

    flock /tmp/lma-bigjob.lock python scripts/bench_feature_store.py [--redis URL]

Starts a local ``redis-server`` on a free port (unless ``--redis`` names one), loads the real
Avazu sample with entity ``device_id`` (``lma features load``'s code path), then times
``await store.fetch(entities)`` for batches of distinct stored devices, one batch at a time, and
the same batch's merge into rows (RedisFeatureSource.fill). Prints a markdown table (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np
import redis

from lma.data import data_root, open_source
from lma.schema import avazu_schema
from service.feature_store import FeatureStore, RedisFeatureSource, load_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.service_fixtures import REDIS_SERVER, RedisServer  # noqa: E402

SIZES = (1, 100, 1000)


async def _measure(url: str, devices: list[str], reps: int) -> list[str]:
    store = FeatureStore(url, "avazu", timeout_s=1.0)
    source = RedisFeatureSource(store)
    schema = avazu_schema()
    lines = [
        "| entities per batch | fetch p50 | fetch p99 | fill (fetch + merge) p50 | per entity p50 |",
        "|---|---|---|---|---|",
    ]
    for n in SIZES:
        batch = [{"device_id": d} for d in devices[:n]]
        for _ in range(10):
            await store.fetch(batch)
        fetch, fill = [], []
        for _ in range(reps):
            t = time.perf_counter()
            await store.fetch(batch)
            fetch.append(time.perf_counter() - t)
            rows: list[dict] = [{} for _ in range(n)]
            t = time.perf_counter()
            await source.fill(schema, rows, None, batch)
            fill.append(time.perf_counter() - t)
        f = np.array(fetch) * 1e3
        p50 = float(np.percentile(f, 50))
        lines.append(
            f"| {n} | {p50:.3f} | {np.percentile(f, 99):.3f} | "
            f"{np.percentile(np.array(fill) * 1e3, 50):.3f} | {p50 / n * 1e3:.1f} us |"
        )
    await store.close()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=None, help="an existing Redis (default: start one)")
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    local = None
    url = args.redis
    if url is None:
        if REDIS_SERVER is None:
            raise SystemExit("redis-server is not installed (or pass --redis URL)")
        local = RedisServer().start()
        url = local.url
    try:
        path = data_root() / "avazu" / "train_9999.csv"
        summary = load_features(open_source(f"avazu:{path}"), ["device_id"], url)
        r = redis.Redis.from_url(url)
        devices = sorted(
            k.decode().rsplit(":", 1)[1]
            for k in r.scan_iter("lma:fs:v1:avazu:device_id:*", count=1000)
            if not k.endswith(b"__meta__")
        )
        if len(devices) < max(SIZES):
            raise SystemExit(f"only {len(devices)} distinct devices; {max(SIZES)} are needed")
        lines = asyncio.run(_measure(url, devices, args.reps))
        print(
            f"Feature store round trip: local redis-server, {summary.keys_written} device_id keys "
            f"from {summary.rows} Avazu rows (loaded in {summary.seconds:.2f} s); {args.reps} "
            f"batches per size, one at a time; {os.cpu_count()} cores. Times in ms."
        )
        print()
        print("\n".join(lines))
    finally:
        if local is not None:
            local.kill()


if __name__ == "__main__":
    main()
