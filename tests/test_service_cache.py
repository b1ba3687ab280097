"""The prediction cache against a real uvicorn process and a real redis-server: repeated rows are
answered from Redis without calling the model (whatever their JSON spelling or protocol), a new
version never reads the old version's entries, and a Redis that goes away costs no request."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.service_fixtures import MODEL, RedisServer, Server, needs_redis, publish_version, redis

TOKEN = "cache-test-token-5d1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N = 16


# -- unit: the key layout -------------------------------------------------------------------


def test_row_digest_is_the_encoded_row():
    from service.cache import key_prefix, row_digests

    rng = np.random.default_rng(0)
    d = rng.normal(size=(4, 13)).astype(np.float32)
    t = rng.integers(-(2**62), 2**62, size=(4, 26), dtype=np.int64)
    h = row_digests(d, t)
    assert len(set(h)) == 4 and all(len(x) == 32 for x in h)
    # Other array types, layouts and the sign of zero do not change a key ...
    d2 = np.asfortranarray(d.astype(np.float64))
    assert row_digests(d2, t.astype(np.int64)) == h
    z = d.copy()
    z[0, 0] = 0.0
    nz = z.copy()
    nz[0, 0] = -0.0
    assert row_digests(z, t)[0] == row_digests(nz, t)[0]
    # ... any change of a value or a token does.
    t2 = t.copy()
    t2[1, 25] += 1
    assert row_digests(d, t2)[1] != h[1] and row_digests(d, t2)[0] == h[0]
    assert key_prefix("ctr", "2", "ab" * 8) == "lma:pc:v1:ctr:2:" + "ab" * 8
    assert key_prefix("a:b c", "1", "00") == "lma:pc:v1:a%3Ab%20c:1:00"


def test_cache_is_off_by_default_and_needs_redis(tmp_path):
    from service.cache import open_cache
    from service.metrics import Metrics
    from service.settings import ServeSettings

    assert open_cache(ServeSettings(models=[str(tmp_path)]), Metrics()) is None
    with pytest.raises(ValueError, match="REDIS_URL"):
        ServeSettings(models=[str(tmp_path)], cache_ttl_s=10)
    with pytest.raises(ValueError, match="REDIS_URL"):
        ServeSettings(models=[str(tmp_path)], reload_channel="lma:reload:v1")


# -- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_server(redis_server: RedisServer, criteo_bundle: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("cache_repo")
    shutil.copytree(criteo_bundle, repo / MODEL / "1")
    s = Server(str(repo), repo.parent / "cache.log", admin_token=TOKEN,
               redis_url=redis_server.url, cache_ttl_s=60,
               # Generous: on a loaded machine a starved event loop must not turn the first
               # call into a timeout (the down test kills Redis: refusals are immediate).
               cache_timeout_ms=2000).wait_ready()
    s.model_dir = repo / MODEL  # type: ignore[attr-defined]
    yield s
    s.stop()


def _predict(server: Server, rows: list[dict], **headers: str) -> requests.Response:
    return requests.post(f"{server.url}/v1/models/{MODEL}:predict", json={"instances": rows},
                         headers=headers, timeout=30)


class Counts:
    """The cache's and the model's counters of one server, to compare before and after."""

    def __init__(self, server: Server):
        m = server.metric
        self.hits = m("lma_prediction_cache_hits_total", model=MODEL)
        self.misses = m("lma_prediction_cache_misses_total", model=MODEL)
        self.writes = m("lma_prediction_cache_writes_total", model=MODEL)
        self.batches = m("lma_batch_rows_count", model=MODEL)
        self.rows = m("lma_batch_rows_sum", model=MODEL)
        self.errors = m("lma_prediction_cache_errors_total")


def _wait_writes(server: Server, at_least: float, timeout: float = 10.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if Counts(server).writes >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"cache writes did not reach {at_least}")


def _respell(row: dict) -> dict:
    """The same row as other JSON: keys reversed, integers as floats, categoricals unchanged."""
    return {k: (float(v) if isinstance(v, int) else v) for k, v in reversed(row.items())}


@needs_redis
def test_repeated_rows_come_from_the_cache(cache_server, redis_server, criteo_rows):
    rows = criteo_rows.records[:N]
    c0 = Counts(cache_server)
    r = _predict(cache_server, rows)
    assert r.status_code == 200, r.text
    first = r.json()["predictions"]
    np.testing.assert_allclose(first, criteo_rows.expected[:N], atol=1e-6, rtol=0)
    c1 = Counts(cache_server)
    assert (c1.hits - c0.hits, c1.misses - c0.misses) == (0, N), cache_server.log.read_text()
    assert c1.rows - c0.rows == N
    _wait_writes(cache_server, c0.writes + N)

    # The same rows, spelt differently: every row a hit, the model not called at all.
    r = _predict(cache_server, [_respell(x) for x in rows])
    assert r.status_code == 200 and r.json()["version"] == "1"
    assert r.json()["predictions"] == first
    c2 = Counts(cache_server)
    assert (c2.hits - c1.hits, c2.misses - c1.misses) == (N, 0)
    assert (c2.batches, c2.rows) == (c1.batches, c1.rows), "the model was called on a full hit"
    assert cache_server.metric("lma_prediction_cache_hit_ratio", model=MODEL) == pytest.approx(
        c2.hits / (c2.hits + c2.misses))

    # The v2 protocol's encoded tensors of the same rows find the same entries.
    body = {"inputs": [
        {"name": "dense", "shape": [N, 13], "datatype": "FP32",
         "data": criteo_rows.dense[:N].ravel().tolist()},
        {"name": "tokens", "shape": [N, 26], "datatype": "INT64",
         "data": criteo_rows.tokens[:N].ravel().tolist()}]}
    r = requests.post(f"{cache_server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], first, atol=1e-6)
    c3 = Counts(cache_server)
    assert (c3.hits - c2.hits, c3.misses - c2.misses, c3.rows - c2.rows) == (N, 0, 0)

    # Half known, half new: only the new half is scored, answers in input order.
    mixed = criteo_rows.records[N // 2:N + N // 2]
    r = _predict(cache_server, mixed)
    np.testing.assert_allclose(r.json()["predictions"],
                               criteo_rows.expected[N // 2:N + N // 2], atol=1e-6, rtol=0)
    c4 = Counts(cache_server)
    assert (c4.hits - c3.hits, c4.misses - c3.misses) == (N // 2, N // 2)
    assert c4.rows - c3.rows == N // 2

    # Entries carry the TTL, under the documented layout.
    client = redis.Redis.from_url(redis_server.url)
    keys = list(client.scan_iter(f"lma:pc:v1:{MODEL}:1:*", count=1000))
    assert len(keys) == N + N // 2
    assert all(0 < client.pttl(k) <= 60_000 for k in keys[:5])
    assert all(len(client.get(k)) == 4 for k in keys[:5])


@needs_redis
def test_a_new_version_does_not_read_old_entries(cache_server, redis_server, criteo_rows,
                                                 criteo_bundle_v2):
    from lma.predictor import Predictor

    rows = criteo_rows.records[:N]
    want2 = Predictor.open(criteo_bundle_v2).predict(criteo_rows.dense[:N], criteo_rows.tokens[:N])
    assert _predict(cache_server, rows).json()["version"] == "1"  # cached for version 1
    publish_version(criteo_bundle_v2, cache_server.model_dir, "2")
    r = requests.post(f"{cache_server.url}/v1/models/{MODEL}/reload", headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["loaded"]["version"] == "2", r.text
    c0 = Counts(cache_server)
    r = _predict(cache_server, rows)
    assert r.json()["version"] == "2"
    np.testing.assert_allclose(r.json()["predictions"], want2, atol=1e-6, rtol=0)
    c1 = Counts(cache_server)
    assert (c1.hits - c0.hits, c1.misses - c0.misses, c1.rows - c0.rows) == (0, N, N)
    _wait_writes(cache_server, c0.writes + N)
    r = _predict(cache_server, rows)
    np.testing.assert_allclose(r.json()["predictions"], want2, atol=1e-6, rtol=0)
    assert Counts(cache_server).hits - c1.hits == N
    client = redis.Redis.from_url(redis_server.url)
    assert len(list(client.scan_iter(f"lma:pc:v1:{MODEL}:2:*", count=1000))) == N


@needs_redis
def test_redis_down_costs_no_request(cache_server, redis_server, criteo_rows, criteo_bundle_v2):
    """Redis killed: every request is still answered, by the model, within its deadline, and
    the failures are counted; Redis back: the cache serves again without a restart."""
    from lma.predictor import Predictor

    rows = criteo_rows.records[:N]
    want2 = Predictor.open(criteo_bundle_v2).predict(criteo_rows.dense[:N], criteo_rows.tokens[:N])
    redis_server.kill()
    c0 = Counts(cache_server)
    for _ in range(10):
        t0 = time.monotonic()
        r = _predict(cache_server, rows, **{"X-Timeout-Ms": "500"})
        assert time.monotonic() - t0 < 2.0
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], want2, atol=1e-6, rtol=0)
    c1 = Counts(cache_server)
    assert c1.errors - c0.errors >= 10  # one failure, then skipped while backing off
    assert cache_server.metric("lma_prediction_cache_errors_total", op="get",
                               reason="backoff") >= 1
    assert c1.rows - c0.rows == 10 * N and c1.hits == c0.hits

    redis_server.start()  # empty: the entries died with the process
    t_end = time.monotonic() + 30
    while time.monotonic() < t_end:
        _predict(cache_server, rows)
        if Counts(cache_server).hits > c1.hits:
            break
        time.sleep(0.2)
    assert Counts(cache_server).hits > c1.hits, "the cache did not come back with Redis"
