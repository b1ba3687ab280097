"""The Redis feature store against a real redis-server: key layout, `lma features load/get` from
the real Avazu rows, FeatureStore.fetch (one round trip, timeouts, back-off, recovery)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from lma.data import open_source  # noqa: E402
from lma.records import encode_records  # noqa: E402
from lma.schema import avazu_schema  # noqa: E402
from service.feature_store import (  # noqa: E402
    FeatureStore,
    FeatureStoreError,
    entity_key,
    load_features,
    merge_stored,
)
from service.features_cli import register  # noqa: E402
from tests.service_fixtures import REDIS_SERVER, RedisServer, free_port, needs_redis  # noqa: E402


@pytest.fixture(scope="module")
def server():
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    s = RedisServer().start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def avazu_path(shared_data) -> Path:
    path = shared_data / "avazu" / "train_9999.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


# -- key layout ----------------------------------------------------------------------------


def test_key_layout() -> None:
    assert entity_key("avazu", {"device_id": "a99f214a"}) == "lma:fs:v1:avazu:device_id:a99f214a"
    both = entity_key("p", {"site_id": "s:1", "device_id": "a,b"})
    assert both == "lma:fs:v1:p:device_id,site_id:a%2Cb,s%3A1"
    assert entity_key("p", {"C14": 15706}) == entity_key("p", {"C14": "15706"})
    assert entity_key("p", {"C14": 15706.0}) == entity_key("p", {"C14": "15706"})
    for bad in ({"device_id": ""}, {"device_id": None}, {"device_id": {"a": 1}}, {}):
        with pytest.raises(ValueError):
            entity_key("p", bad)
    with pytest.raises(ValueError):
        entity_key("a:b", {"x": "1"})


# -- loading -------------------------------------------------------------------------------


def _latest_rows(path: Path, entity: str) -> dict[str, dict[str, str]]:
    """Each entity's latest row read independently: max hour, ties to the later line."""
    latest: dict[str, tuple[float, int, dict[str, str]]] = {}
    n = 0
    for table, _ in open_source(f"avazu:{path}").iter_tables():
        for row in table.to_pylist():
            n += 1
            key = row[entity]
            if not key:
                continue
            t = float(row["hour"])
            if key not in latest or (t, n) >= latest[key][:2]:
                latest[key] = (t, n, row)
    return {k: v[2] for k, v in latest.items()}


@needs_redis
def test_load_and_get_from_real_avazu_rows(server: RedisServer, avazu_path: Path, capsys) -> None:
    r = redis.Redis.from_url(server.url)
    r.flushdb()
    assert (
        _cli(
            [
                "features",
                "load",
                "--data",
                f"avazu:{avazu_path}",
                "--entity",
                "device_id",
                "--redis",
                server.url,
                "--ttl",
                "3600",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    latest = _latest_rows(avazu_path, "device_id")
    assert summary["rows"] == 9999
    assert summary["keys_written"] == len(latest) > 100
    keys = [k for k in r.scan_iter("lma:fs:v1:avazu:device_id:*") if not k.endswith(b"__meta__")]
    assert len(keys) == len(latest)
    meta = {
        k.decode(): v.decode() for k, v in r.hgetall("lma:fs:v1:avazu:device_id:__meta__").items()
    }
    assert meta["layout"] == "1" and meta["keys"] == str(len(latest))
    fields = json.loads(meta["fields"])
    assert "device_id" not in fields and "click" not in fields and "hour" in fields
    # Every entity's hash is its latest row's non-empty values, plus the time.
    for device, row in latest.items():
        got = {
            k.decode(): v.decode()
            for k, v in r.hgetall(entity_key("avazu", {"device_id": device})).items()
        }
        want = {k: row[k] for k in fields if row[k]} | {"__ts": row["hour"]}
        assert got == want, device
    ttl = r.ttl(entity_key("avazu", {"device_id": next(iter(latest))}))
    assert 3500 < ttl <= 3600

    device = max(latest, key=lambda d: d != "a99f214a")
    assert (
        _cli(
            [
                "features",
                "get",
                "--entity",
                f"device_id={device}",
                "--project",
                "avazu",
                "--redis",
                server.url,
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["device_model"] == latest[device]["device_model"]
    assert (
        _cli(
            [
                "features",
                "get",
                "--entity",
                "device_id=nope",
                "--project",
                "avazu",
                "--redis",
                server.url,
            ]
        )
        == 1
    )

    # A reload with fewer fields replaces each hash whole.
    assert (
        _cli(
            [
                "features",
                "load",
                "--data",
                f"avazu:{avazu_path}",
                "--entity",
                "device_id",
                "--fields",
                "device_model",
                "--redis",
                server.url,
                "--quiet",
            ]
        )
        == 0
    )
    got = r.hgetall(entity_key("avazu", {"device_id": device}))
    assert set(got) == {b"device_model", b"__ts"}
    assert r.ttl(entity_key("avazu", {"device_id": device})) == -1


@needs_redis
def test_compound_entity_and_no_time_column(server: RedisServer, tmp_path: Path) -> None:
    import pyarrow as pa

    from lma.data import TableSource
    from lma.schema import Schema

    schema = Schema.from_dict(
        {"name": "t", "label": None, "dense": ["x"], "categorical": ["user", "site", "c"]}
    )
    table = pa.table(
        {
            "user": ["u1", "u1", "u2", "u1", ""],
            "site": ["s", "s", "s", "t", "s"],
            "x": ["1", "2", "3", "4", "5"],
            "c": ["a", "b", "", "d", "e"],
        }
    )
    r = redis.Redis.from_url(server.url)
    summary = load_features(TableSource(table, schema, chunk_rows=2), ["user", "site"], server.url)
    assert summary.keys_written == 3 and summary.rows_without_entity == 1
    got = r.hgetall(entity_key("t", {"user": "u1", "site": "s"}))
    assert got == {b"x": b"2", b"c": b"b"}  # the later row, across chunks
    assert r.hgetall(entity_key("t", {"site": "s", "user": "u2"})) == {b"x": b"3"}


# -- reading -------------------------------------------------------------------------------


@needs_redis
def test_fetch_merges_like_inline_features(server: RedisServer, avazu_path: Path) -> None:
    load_features(open_source(f"avazu:{avazu_path}"), ["device_id"], server.url)
    latest = _latest_rows(avazu_path, "device_id")
    devices = list(latest)[:40]
    schema = avazu_schema()

    async def go():
        store = FeatureStore(server.url, "avazu", timeout_s=1.0)
        r = redis.Redis.from_url(server.url)

        def counts() -> tuple[int, int]:
            st = r.info("commandstats")
            calls = sum(
                int(st.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha")
            )
            return int(st["cmdstat_hgetall"]["calls"]), calls

        await store.fetch([{"device_id": devices[0]}])  # loads the script
        before = counts()
        # Requests carry the entity and a request-level value (hour); duplicates and unknowns.
        ents = [{"device_id": d} for d in devices] + [
            {"device_id": devices[0]},
            {"device_id": "zz"},
            None,
        ]
        stored = await store.fetch(ents)
        after = counts()
        await store.close()
        return stored, (after[0] - before[0], after[1] - before[1]), store.stats

    stored, (calls, round_trips), stats = asyncio.run(go())
    assert calls == len(devices) + 1  # each distinct key once
    assert round_trips == 1  # one script call for the whole batch
    assert stored[-1] is None and stored[-2] is None and stored[-3] == stored[0]
    assert stats.hits == len(devices) + 1 and stats.misses == 1
    rows = [{"device_id": d, "hour": "14102300"} for d in devices]
    merged = merge_stored(rows, stored[: len(devices)])
    inline = [
        {k: v for k, v in latest[d].items() if k != "click"} | {"hour": "14102300"} for d in devices
    ]
    a, b = encode_records(schema, merged), encode_records(schema, inline)
    assert a.errors == [] and a.unknown == []
    np.testing.assert_array_equal(a.tokens, b.tokens)


def _silent_server() -> tuple[socket.socket, int]:
    """A TCP server that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return s, s.getsockname()[1]


def test_fetch_times_out_on_a_silent_server() -> None:
    sock, port = _silent_server()
    try:

        async def go():
            store = FeatureStore(f"redis://127.0.0.1:{port}/0", "p", timeout_s=0.2, backoff_s=5)
            t0 = time.perf_counter()
            with pytest.raises(FeatureStoreError):
                await store.fetch([{"id": "1"}])
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            with pytest.raises(FeatureStoreError, match="unavailable"):
                await store.fetch([{"id": "1"}])
            second = time.perf_counter() - t0
            assert not await store.ping()
            await store.close()
            return first, second, store.stats.errors

        first, second, errors = asyncio.run(go())
        assert first < 1.0 and second < 0.05 and errors == 3
    finally:
        sock.close()


def test_request_deadline_bounds_the_wait_without_back_off() -> None:
    """A call given the request's deadline waits min(store timeout, time left); running out of
    the request's own time is FeatureStoreDeadline and leaves the store available to others."""
    from service.feature_store import FeatureStoreDeadline

    sock, port = _silent_server()
    try:

        async def go():
            store = FeatureStore(f"redis://127.0.0.1:{port}/0", "p", timeout_s=2.0, backoff_s=5)
            t0 = time.perf_counter()
            with pytest.raises(FeatureStoreDeadline):
                await store.fetch([{"id": "1"}], until=time.monotonic() + 0.15)
            waited = time.perf_counter() - t0
            after_deadline = store.available
            with pytest.raises(FeatureStoreDeadline):
                await store.fetch([{"id": "1"}], until=time.monotonic() - 1)
            # The store's own timeout, shorter than the time left: a store failure, back-off.
            store.timeout_s = 0.1
            with pytest.raises(FeatureStoreError) as e:
                await store.fetch([{"id": "1"}], until=time.monotonic() + 5)
            kind = e.value.kind
            await store.close()
            return waited, after_deadline, kind, store.available

        waited, after_deadline, kind, available = asyncio.run(go())
        assert 0.1 < waited < 1.0 and after_deadline is True
        assert kind == "timeout" and available is False
    finally:
        sock.close()


@needs_redis
def test_redis_killed_and_restarted(tmp_path: Path) -> None:
    srv = RedisServer().start()
    try:
        redis.Redis.from_url(srv.url).hset(entity_key("p", {"id": "1"}), mapping={"c": "x"})

        async def go():
            store = FeatureStore(srv.url, "p", timeout_s=0.2, backoff_s=0.2, max_backoff_s=0.4)
            assert await store.fetch([{"id": "1"}]) == [{"c": "x"}]
            srv.kill()
            t0 = time.perf_counter()
            with pytest.raises(FeatureStoreError):
                await store.fetch([{"id": "1"}])
            assert time.perf_counter() - t0 < 1.0
            srv.start()
            redis.Redis.from_url(srv.url).hset(entity_key("p", {"id": "1"}), mapping={"c": "y"})
            deadline = time.monotonic() + 10
            while True:
                try:
                    got = await store.fetch([{"id": "1"}])
                    break
                except FeatureStoreError:
                    assert time.monotonic() < deadline, "the store did not come back"
                    await asyncio.sleep(0.05)
            await store.close()
            return got

        assert asyncio.run(go()) == [{"c": "y"}]
    finally:
        srv.kill()


@needs_redis
def test_feature_source_hook(server: RedisServer, avazu_path: Path) -> None:
    from service.errors import RequestError
    from service.feature_store import RedisFeatureSource

    load_features(open_source(f"avazu:{avazu_path}"), ["device_id"], server.url)
    latest = _latest_rows(avazu_path, "device_id")
    devices = [d for d in latest if d != "a99f214a"][:3]
    schema = avazu_schema()

    async def go(url: str, required: bool, rows: list[dict], entities, row_entities):
        src = RedisFeatureSource(FeatureStore(url, "avazu", timeout_s=0.5), required=required)
        try:
            return await src.fill(schema, rows, entities, row_entities)
        finally:
            await src.store.close()

    # Request-level entity: every row gets the device's stored fields and device_id itself;
    # a row's own value wins.
    rows = [{"hour": "14102300", "C1": "9999"}, {"hour": "14102300"}]
    warnings = asyncio.run(go(server.url, False, rows, {"device_id": devices[0]}, None))
    assert warnings == []
    want = latest[devices[0]]
    assert rows[0]["C1"] == "9999" and rows[1]["C1"] == want["C1"]
    assert rows[1]["device_id"] == devices[0] and rows[1]["device_model"] == want["device_model"]
    assert rows[1]["hour"] == "14102300"
    # Per-row entities go over the request's; a row whose own entity is unknown (a warning)
    # still gets the request entity's stored fields, under its own entity fields.
    rows = [{}, {}, {}]
    per_row = [{"device_id": devices[1]}, {"device_id": "nope"}, None]
    warnings = asyncio.run(go(server.url, False, rows, {"device_id": devices[2]}, per_row))
    assert rows[0]["device_model"] == latest[devices[1]]["device_model"]
    assert rows[0]["device_id"] == devices[1]
    assert rows[1]["device_id"] == "nope"
    assert rows[1]["device_model"] == latest[devices[2]]["device_model"]
    assert rows[2]["device_model"] == latest[devices[2]]["device_model"]
    assert rows[2]["device_id"] == devices[2]
    assert len(warnings) == 1 and "row 1" in warnings[0]
    # Store down: a warning, or 503 when it is required; a bad entity value is a 422.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    warnings = asyncio.run(go(dead, False, [{}], {"device_id": devices[0]}, None))
    assert len(warnings) == 1 and "unavailable" in warnings[0]
    with pytest.raises(RequestError) as e:
        asyncio.run(go(dead, True, [{}], {"device_id": devices[0]}, None))
    assert e.value.status == 503
    with pytest.raises(RequestError) as e:
        asyncio.run(go(server.url, False, [{}], {"device_id": ""}, None))
    assert e.value.status == 422 and e.value.field == "entities"


OPENSSL = shutil.which("openssl")


@needs_redis
@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_service_store_over_tls_with_password(tmp_path: Path, monkeypatch) -> None:
    """The service's own wiring (settings -> open_feature_source) on a rediss:// URL with a
    password, against a redis-server speaking TLS only; a wrong password is a store error."""
    from service.feature_store import open_feature_source
    from service.metrics import Metrics
    from service.settings import ServeSettings

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind",
                             "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-auth-clients", "no", "--save", "", "--requirepass", "pw"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        sync = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                sync.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        sync.hset(entity_key("avazu", {"device_id": "d1"}), mapping={"C1": "1005"})
        monkeypatch.setenv("REDIS_URL", url)
        settings = ServeSettings(models=["unused"], feature_timeout_ms=2000)
        assert "pw" not in repr(settings)

        async def go(s: ServeSettings):
            source = open_feature_source(s, Metrics())
            assert source is not None
            try:
                got = await source.store.fetch([{"device_id": "d1"}], project="avazu")
                return got, await source.status(probe=True)
            finally:
                await source.close()

        got, status = asyncio.run(go(settings))
        assert got == [{"C1": "1005"}]
        assert status["reachable"] is True and status["url"].startswith("rediss://:***@")
        monkeypatch.setenv("REDIS_URL", url.replace(":pw@", ":wrong@"))
        with pytest.raises(FeatureStoreError):
            asyncio.run(go(ServeSettings(models=["unused"], feature_timeout_ms=2000)))
        monkeypatch.delenv("REDIS_URL")
        assert open_feature_source(ServeSettings(models=["unused"])) is None
    finally:
        proc.kill()
        proc.wait()
