"""Reload triggers besides the admin routes, against real uvicorn processes and a real
redis-server: a message on the reload channel reloads two servers sharing one Redis under load
(zero failed requests, every answer from the old or the new version and equal to its offline
predictions), the admin route's broadcast, the listener's reconnect after Redis restarts, a
tampered version refused by every replica, and the folder watch."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.service_fixtures import (
    MODEL,
    RedisServer,
    Server,
    needs_redis,
    publish_version,
    redis,
)

pytestmark = pytest.mark.slow

TOKEN = "triggers-test-token-91c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N = 16


def _predict(server: Server, rows: list[dict], session: requests.Session | None = None
             ) -> requests.Response:
    return (session or requests).post(f"{server.url}/v1/models/{MODEL}:predict",
                                      json={"instances": rows}, timeout=30)


def _serving(server: Server) -> str:
    return requests.get(f"{server.url}/v1/models/{MODEL}", timeout=5).json()["version"]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Answer:
    start: float
    end: float
    status: int | None
    body: object


@dataclass
class Load:
    """Client threads sending the same rows to each server until stopped."""

    servers: list[Server]
    rows: list[dict]
    per_server: int = 2
    results: dict[int, list[Answer]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, i: int) -> None:
        out = self.results[i]
        with requests.Session() as sess:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = _predict(self.servers[i], self.rows, sess)
                    body = r.json() if r.ok else r.text
                    out.append(Answer(t0, time.monotonic(), r.status_code, body))
                except requests.RequestException as exc:
                    out.append(Answer(t0, time.monotonic(), None, repr(exc)))

    def __enter__(self) -> Load:
        for i in range(len(self.servers)):
            self.results[i] = []
            for _ in range(self.per_server):
                t = threading.Thread(target=self._client, args=(i,))
                t.start()
                self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def first_end(self, i: int, version: str) -> float | None:
        """When the first answer carrying ``version`` arrived from server ``i``."""
        ends = [a.end for a in self.results[i] if isinstance(a.body, dict)
                and a.body.get("version") == version]
        return min(ends) if ends else None

    def check(self, want: dict[str, np.ndarray], new: str) -> dict[int, dict[str, int]]:
        """Zero failures; each answer from a known version, equal to that version's offline
        predictions; once a server has answered from ``new``, every request started later
        gets ``new`` (the swap is atomic and the old version is gone)."""
        seen: dict[int, dict[str, int]] = {}
        for i, answers in self.results.items():
            failed = [a for a in answers if a.status != 200]
            assert not failed, failed[:3]
            swapped = self.first_end(i, new)
            assert swapped is not None, f"server {i} never answered from version {new}"
            seen[i] = {v: 0 for v in want}
            for a in answers:
                assert isinstance(a.body, dict)
                v = a.body["version"]
                assert v in want, v
                np.testing.assert_allclose(a.body["predictions"], want[v], atol=1e-6, rtol=0)
                seen[i][v] += 1
                if a.start > swapped:
                    assert v == new, (i, a)
            assert sum(a.start > swapped for a in answers) > 0, f"no request after server {i}'s swap"
        return seen


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, criteo_bundle: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[list[Server], Path, str]]:
    """Two server processes on one model repository, both subscribed to one reload channel."""
    repo = tmp_path_factory.mktemp("pubsub_repo")
    shutil.copytree(criteo_bundle, repo / MODEL / "1")
    channel = f"lma:reload:v1:test-{uuid.uuid4().hex[:6]}"
    logs = tmp_path_factory.mktemp("pubsub_logs")
    servers = [Server(str(repo), logs / f"s{i}.log", admin_token=TOKEN,
                      redis_url=redis_server.url, reload_channel=channel) for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        client = redis.Redis.from_url(redis_server.url)
        _wait(lambda: dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) == 2, 30,
              "both servers to subscribe")
        yield servers, repo / MODEL, channel
    finally:
        for s in servers:
            s.stop()


def _cli(argv: list[str]) -> int:
    """``lma models ...`` through its own parser (the entry point is installed at merge time)."""
    from service import models_cli

    parser = argparse.ArgumentParser(prog="lma")
    models_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@needs_redis
def test_pubsub_reload_under_load_on_two_servers(pair, redis_server, criteo_rows,
                                                 criteo_bundle_v2, tmp_path, capsys):
    from lma.predictor import Predictor

    servers, model_dir, channel = pair
    rows = criteo_rows.records[:N]
    want = {"1": criteo_rows.expected[:N],
            "2": Predictor.open(criteo_bundle_v2).predict(criteo_rows.dense[:N],
                                                          criteo_rows.tokens[:N])}
    assert np.max(np.abs(want["1"] - want["2"])) > 1e-3, "the two versions must answer differently"
    assert [_serving(s) for s in servers] == ["1", "1"]
    with Load(servers, rows) as load:
        time.sleep(1.5)
        published = time.monotonic()
        assert _cli(["models", "publish", str(criteo_bundle_v2), "--repository",
                     str(model_dir.parent), "--channel", channel,
                     "--redis", redis_server.url]) == 0
        _wait(lambda: all(load.first_end(i, "2") for i in range(2)), 60,
              "both servers to answer from version 2")
        time.sleep(1.5)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == "2" and out["broadcast"] == {"channel": channel, "receivers": 2}
    seen = load.check(want, "2")
    assert all(s["1"] > 0 and s["2"] > 0 for s in seen.values()), seen
    for i, s in enumerate(servers):
        lag = load.first_end(i, "2") - published
        print(f"server {i}: publish -> first version-2 answer {lag:.3f} s")
        info = requests.get(f"{s.url}/v1/models/{MODEL}", timeout=5).json()
        assert info["version"] == "2" and info["versions"] == ["2"]
        assert s.metric("lma_reload_triggers_total", model=MODEL, trigger="pubsub",
                        outcome="loaded") == 1
        assert s.metric("lma_reload_messages_total", result="reload") == 1
        assert s.metric("lma_unloads_total", model=MODEL) == 1
        assert s.metric("lma_reload_listener_connected") == 1


@needs_redis
def test_broadcast_from_the_admin_route(pair, criteo_rows, criteo_bundle):
    """``?broadcast=true`` on one server reloads it directly and every other replica by the
    channel; its own listener skips its own message."""
    servers, model_dir, channel = pair
    assert [_serving(s) for s in servers] == ["2", "2"], "runs after the pub/sub test"
    publish_version(criteo_bundle, model_dir, "3")
    r = requests.post(f"{servers[0].url}/v1/models/{MODEL}/reload?broadcast=true", headers=AUTH,
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loaded"]["version"] == "3" and body["unloaded"] == ["2"]
    assert body["broadcast"] == {"channel": channel, "receivers": 2}
    _wait(lambda: _serving(servers[1]) == "3", 30, "the other server to reload")
    assert servers[0].metric("lma_reload_messages_total", result="own") == 1
    assert servers[0].metric("lma_reload_triggers_total", model=MODEL, trigger="admin",
                             outcome="loaded") == 1
    assert servers[1].metric("lma_reload_triggers_total", model=MODEL, trigger="pubsub",
                             outcome="loaded") == 2
    for s in servers:
        r = _predict(s, criteo_rows.records[:N])
        assert r.status_code == 200 and r.json()["version"] == "3"
        np.testing.assert_allclose(r.json()["predictions"], criteo_rows.expected[:N], atol=1e-6)


@needs_redis
def test_listener_reconnects_and_catches_up(pair, redis_server, criteo_rows, criteo_bundle_v2):
    """Redis killed: the servers keep answering; a version published meanwhile is loaded when
    the listener is back (the message it could not receive is made up for by a check of every
    model on reconnect); then a tampered version is refused by both, which keep serving."""
    servers, model_dir, channel = pair
    assert [_serving(s) for s in servers] == ["3", "3"], "runs after the broadcast test"
    redis_server.kill()
    _wait(lambda: all(s.metric("lma_reload_listener_connected") == 0 for s in servers), 30,
          "the listeners to notice Redis is gone")
    for s in servers:
        assert _predict(s, criteo_rows.records[:N]).status_code == 200
    publish_version(criteo_bundle_v2, model_dir, "4")
    redis_server.start()
    _wait(lambda: all(_serving(s) == "4" for s in servers), 60,
          "both servers to catch up on version 4 after the reconnect")
    client = redis.Redis.from_url(redis_server.url)
    _wait(lambda: dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) == 2, 30,
          "both servers to subscribe again")
    for s in servers:
        assert s.metric("lma_reload_listener_reconnects_total") >= 1
        assert s.metric("lma_reload_listener_connected") == 1

    before = [s.metric("lma_reload_failures_total", model=MODEL, stage="open") for s in servers]
    publish_version(criteo_bundle_v2, model_dir, "5", tamper=True)
    assert _cli(["models", "notify", MODEL, "--channel", channel,
                 "--redis", redis_server.url]) == 0
    _wait(lambda: all(s.metric("lma_reload_triggers_total", model=MODEL, trigger="pubsub",
                               outcome="refused") >= 1 for s in servers), 60,
          "both servers to refuse version 5")
    for s, b in zip(servers, before, strict=True):
        assert s.metric("lma_reload_failures_total", model=MODEL, stage="open") == b + 1
        r = _predict(s, criteo_rows.records[:N])
        assert r.status_code == 200 and r.json()["version"] == "4"


def test_folder_watch_picks_up_new_versions(criteo_bundle, criteo_bundle_v2, criteo_rows,
                                            tmp_path):
    """A new version folder is loaded by the watch alone; a tampered one is refused once (not
    retried every poll) and the old version keeps answering; the next good one is loaded."""
    from lma.predictor import Predictor

    repo = tmp_path / "repo"
    shutil.copytree(criteo_bundle, repo / MODEL / "1")
    s = Server(str(repo), tmp_path / "watch.log", watch_interval_s=0.3).wait_ready()
    try:
        rows = criteo_rows.records[:N]
        want2 = Predictor.open(criteo_bundle_v2).predict(criteo_rows.dense[:N],
                                                         criteo_rows.tokens[:N])
        publish_version(criteo_bundle_v2, repo / MODEL, "2")
        _wait(lambda: _serving(s) == "2", 30, "the watch to load version 2")
        r = _predict(s, rows)
        assert r.status_code == 200 and r.json()["version"] == "2"
        np.testing.assert_allclose(r.json()["predictions"], want2, atol=1e-6, rtol=0)
        assert s.metric("lma_reload_triggers_total", model=MODEL, trigger="watch",
                        outcome="loaded") == 1

        publish_version(criteo_bundle, repo / MODEL, "3", tamper=True)
        _wait(lambda: s.metric("lma_reload_failures_total", model=MODEL, stage="open") == 1, 30,
              "the watch to refuse version 3")
        time.sleep(1.5)  # five more polls: the refused folder is not tried again
        assert s.metric("lma_reload_failures_total", model=MODEL, stage="open") == 1
        assert _serving(s) == "2" and _predict(s, rows).json()["version"] == "2"

        publish_version(criteo_bundle, repo / MODEL, "4")
        _wait(lambda: _serving(s) == "4", 30, "the watch to load version 4")
        r = _predict(s, rows)
        np.testing.assert_allclose(r.json()["predictions"], criteo_rows.expected[:N], atol=1e-6)
        info = requests.get(f"{s.url}/v1/models/{MODEL}", timeout=5).json()
        assert info["versions"] == ["4"]
    finally:
        s.stop()


def test_reload_message_format():
    from service.pubsub import ORIGIN, message, parse_message

    assert parse_message(message("ctr")) == ("ctr", ORIGIN)
    assert parse_message(b"ctr") == ("ctr", None)
    assert parse_message('{"model": "m", "origin": "x"}') == ("m", "x")
    for bad in (b"", b"two words", b'{"model": ""}', b'{"name": "m"}'):
        with pytest.raises(ValueError):
            parse_message(bad)
