"""The feature store inside the running service, end to end: a real redis-server (password in its
URL), real uvicorn processes serving an LMA bundle trained on the real Avazu sample, `lma features
load` from the same rows. Entity requests (v1 instances, ranking, v2) must answer exactly what the
same requests carrying the features inline answer; Redis hung, killed and restarted under a run of
requests must cost inline requests nothing and entity requests only the documented behaviour."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

redis = pytest.importorskip("redis")

from tests.service_fixtures import REDIS_SERVER, RedisServer, Server  # noqa: E402

MODEL = "avazu_lma"
PASSWORD = "s3cret-pw"
PREDICT = f"/v1/models/{MODEL}:predict"
INFER = f"/v2/models/{MODEL}/infer"


@dataclass
class Env:
    redis: RedisServer
    warn: Server  # REDIS_URL set, missing values + warning when the store cannot answer
    required: Server  # LMA_SERVE_FEATURES_REQUIRED: 503 instead
    inline: Server  # no REDIS_URL
    latest: dict[str, dict[str, str]]  # device_id -> its latest Avazu row (minus id, click)
    avazu: Path


@pytest.fixture(scope="module")
def avazu_path(shared_data: Path) -> Path:
    path = shared_data / "avazu" / "train_9999.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def avazu_repo(avazu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lma train` (LMA at 16x, one epoch) on the Avazu sample, then `lma export`."""
    from lma.cli import main

    root = tmp_path_factory.mktemp("avazu")
    assert main(["-q", "train", "--data", f"avazu:{avazu_path}", "--embedding", "lma",
                 "--compression", "16", "--epochs", "1", "--threads", "1",
                 "--out", str(root / "run")]) == 0
    assert main(["-q", "export", str(root / "run"), "--out", str(root / "repo" / MODEL / "1"),
                 "--name", MODEL, "--sample-rows", "32"]) == 0
    return root / "repo"


def latest_rows(path: Path) -> dict[str, dict[str, str]]:
    """Each device's latest row, read with the csv module alone: max hour, ties to the later
    line (the store's rule), without the id and the label."""
    out: dict[str, tuple[int, dict[str, str]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            d = row["device_id"]
            if not d:
                continue
            hour = int(row["hour"])
            if d not in out or hour >= out[d][0]:
                out[d] = (hour, {k: v for k, v in row.items() if k not in ("id", "click")})
    return {d: r for d, (_, r) in out.items()}


def load(url: str, avazu: Path) -> dict:
    import json
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "lma.cli", "-q", "features", "load", "--data", f"avazu:{avazu}",
         "--entity", "device_id", "--redis", url, "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@contextmanager
def _without_redis_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in ("REDIS_URL", "LMA_SERVE_REDIS_URL") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def env(avazu_repo: Path, avazu_path: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Env]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    logs = tmp_path_factory.mktemp("fs_logs")
    rs = RedisServer(password=PASSWORD).start()
    summary = load(rs.url, avazu_path)
    latest = latest_rows(avazu_path)
    assert summary["keys_written"] == len(latest) > 100
    with _without_redis_env():
        # Started together: their start-ups overlap.
        servers = [
            Server(str(avazu_repo), logs / "warn.log", redis_url=rs.url,
                   feature_timeout_ms=100),
            Server(str(avazu_repo), logs / "required.log", redis_url=rs.url,
                   features_required="true", feature_timeout_ms=1000),
            Server(str(avazu_repo), logs / "inline.log"),
        ]
    try:
        for s in servers:
            s.wait_ready()
        yield Env(rs, *servers, latest=latest, avazu=avazu_path)
    finally:
        for s in servers:
            s.stop()
        rs.kill()


def _post(server: Server, path: str, body: dict, timeout_ms: float | None = None
          ) -> requests.Response:
    headers = {} if timeout_ms is None else {"X-Timeout-Ms": str(timeout_ms)}
    return requests.post(server.url + path, json=body, headers=headers, timeout=30)


def _ok(r: requests.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _devices(env: Env, n: int, skip: int = 0) -> list[str]:
    # The Avazu sample's most common device is the anonymous "a99f214a"; skip it.
    return [d for d in sorted(env.latest) if d != "a99f214a"][skip:skip + n]


def test_v1_entities_answer_as_inline_features(env: Env) -> None:
    devices = _devices(env, 30)
    override = {"site_id": "1fbe01fe", "hour": "14102923"}  # the request's own values win
    # Per-row entities (instances[i].entities) against the same rows carrying the stored values.
    by_entity = [{"entities": {"device_id": d}, **override} for d in devices]
    inline = [{**env.latest[d], **override} for d in devices]
    a = _ok(_post(env.warn, PREDICT, {"instances": by_entity}))
    b = _ok(_post(env.warn, PREDICT, {"instances": inline}))
    assert "warnings" not in a
    np.testing.assert_array_equal(a["predictions"], b["predictions"])
    # A model that sees the features tells the rows apart (the store was really read).
    assert len(set(a["predictions"])) > 5
    bare = _ok(_post(env.warn, PREDICT, {"instances": [override] * len(devices)}))
    assert not np.array_equal(a["predictions"], bare["predictions"])

    # The request-level entity, one row.
    d = devices[0]
    a = _ok(_post(env.warn, PREDICT, {"entities": {"device_id": d}, "instances": [{}]}))
    b = _ok(_post(env.warn, PREDICT, {"instances": [env.latest[d]]}))
    assert a["predictions"] == b["predictions"] and "warnings" not in a


def test_ranking_entities_answer_as_inline_features(env: Env) -> None:
    user, *cands = _devices(env, 21, skip=40)
    apps = sorted({r["app_id"] for r in env.latest.values()})[:20]
    # The user's entity for the request, each candidate its own app plus (for some) a device
    # entity of its own: candidate entity's stored fields go over the request entity's.
    candidates: list[dict] = []
    inline: list[dict] = []
    for i, app in enumerate(apps):
        if i % 2:
            candidates.append({"app_id": app, "entities": {"device_id": cands[i]}})
            inline.append({**env.latest[user], **env.latest[cands[i]], "app_id": app})
        else:
            candidates.append({"app_id": app})
            inline.append({**env.latest[user], "app_id": app})
    ctx = {"hour": "14102923"}
    a = _ok(_post(env.warn, PREDICT, {"entities": {"device_id": user}, "context": ctx,
                                      "candidates": candidates, "top_k": 3}))
    b = _ok(_post(env.warn, PREDICT, {"candidates": [{**r, **ctx} for r in inline], "top_k": 3}))
    assert "warnings" not in a
    np.testing.assert_array_equal(a["predictions"], b["predictions"])
    assert a["top_k"] == b["top_k"]


def _bytes_tensor(name: str, values: list[str]) -> dict:
    return {"name": name, "shape": [len(values)], "datatype": "BYTES", "data": values}


def test_v2_entities_answer_as_inline_features(env: Env) -> None:
    devices = _devices(env, 12, skip=80)
    fields = [k for k in env.latest[devices[0]] if k != "device_id"]
    inline = {"inputs": [_bytes_tensor(f, [env.latest[d][f] for d in devices])
                         for f in [*fields, "device_id"]]}
    b = _ok(_post(env.warn, INFER, inline))
    # Per row: the device_id tensor is each row's entity (parameters.entity_inputs).
    a = _ok(_post(env.warn, INFER, {"inputs": [_bytes_tensor("device_id", devices)],
                                    "parameters": {"entity_inputs": ["device_id"]}}))
    assert "parameters" not in a
    assert a["outputs"][0]["data"] == b["outputs"][0]["data"]
    # For the whole request (parameters.entities), the request's tensors winning.
    d = devices[0]
    hour = "14102923"
    a = _ok(_post(env.warn, INFER, {"inputs": [_bytes_tensor("hour", [hour])],
                                    "parameters": {"entities": {"device_id": d}}}))
    b = _ok(_post(env.warn, INFER, {"inputs": [
        _bytes_tensor(f, [hour if f == "hour" else env.latest[d][f]]) for f in env.latest[d]]}))
    assert a["outputs"][0]["data"] == b["outputs"][0]["data"]


def test_unknown_and_bad_entities(env: Env) -> None:
    d = _devices(env, 1)[0]
    # Nothing stored for an entity: scored with the row's own values, and a warning.
    a = _ok(_post(env.warn, PREDICT, {"instances": [{"entities": {"device_id": d}},
                                                    {"entities": {"device_id": "no-such"}}]}))
    b = _ok(_post(env.warn, PREDICT, {"instances": [env.latest[d], {"device_id": "no-such"}]}))
    assert a["predictions"] == b["predictions"]
    assert len(a["warnings"]) == 1 and "row 1" in a["warnings"][0]
    a = _ok(_post(env.warn, INFER, {"inputs": [_bytes_tensor("hour", ["14102923"])],
                                    "parameters": {"entities": {"device_id": "no-such"}}}))
    assert "no stored features" in a["parameters"]["warnings"][0]
    # Bad entities: 422 naming the field and the row.
    r = _post(env.warn, PREDICT, {"candidates": [{}, {}, {"entities": {"device_id": ""}}]})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "entities.device_id" and r.json()["row"] == 2
    assert "candidates[2].entities.device_id" in r.json()["error"]
    for bad in ({"device_id": [1]}, {"device_id": True}, {}, "a99f214a", {"device_id": 1e300}):
        r = _post(env.warn, PREDICT, {"entities": bad, "instances": [{}]})
        assert r.status_code == 422 and r.json()["field"].startswith("entities"), r.text
    r = _post(env.warn, PREDICT, {"context": {"entities": {"device_id": d}}, "candidates": [{}]})
    assert r.status_code == 422 and r.json()["field"] == "context.entities"
    r = _post(env.warn, INFER, {"inputs": [_bytes_tensor("hour", ["1"])],
                                "parameters": {"entities": {"device_id": None}}})
    assert r.status_code == 422 and r.json()["field"] == "entities.device_id"
    r = _post(env.warn, INFER, {"inputs": [_bytes_tensor("hour", ["1"])],
                                "parameters": {"entity_inputs": ["device_id"]}})
    assert r.status_code == 400 and r.json()["field"] == "parameters.entity_inputs"
    r = _post(env.warn, INFER, {"inputs": [{"name": "C14", "shape": [2], "datatype": "FP64",
                                            "data": [15706, 1e300]}],
                                "parameters": {"entity_inputs": ["C14"]}})
    assert r.status_code == 422 and (r.json()["field"], r.json()["row"]) == ("C14", 1), r.text


def test_one_round_trip_per_request_and_metrics(env: Env) -> None:
    r = redis.Redis.from_url(env.redis.url)

    def script_calls() -> int:
        st = r.info("commandstats")
        return sum(int(st.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))

    devices = _devices(env, 50, skip=100)
    hits0 = env.warn.metric("lma_feature_store_hits_total")
    misses0 = env.warn.metric("lma_feature_store_misses_total")
    n0 = env.warn.metric("lma_feature_store_seconds_count", result="ok")
    before = script_calls()
    body = {"entities": {"device_id": devices[0]},
            "candidates": [{"entities": {"device_id": d}} for d in devices[1:]]
            + [{"entities": {"device_id": "no-such"}}]}
    _ok(_post(env.warn, PREDICT, body))
    assert script_calls() - before == 1  # 51 entities, one round trip
    assert env.warn.metric("lma_feature_store_hits_total") - hits0 == 50
    assert env.warn.metric("lma_feature_store_misses_total") - misses0 == 1
    assert env.warn.metric("lma_feature_store_seconds_count", result="ok") - n0 == 1
    assert env.warn.metric("lma_feature_store_up") == 1


def test_readiness_details(env: Env) -> None:
    fs = requests.get(env.warn.url + "/v2/health/ready", timeout=5).json()["feature_store"]
    assert fs["configured"] is True and fs["reachable"] is True
    assert PASSWORD not in str(fs) and "***" in fs["url"]
    assert fs["project"] == "each model's schema name" and fs["required"] is False
    info = requests.get(f"{env.required.url}/v1/models/{MODEL}", timeout=5).json()
    assert info["feature_store"]["required"] is True
    # Without REDIS_URL: inline features only, and it says so; entities are refused.
    ready = requests.get(env.inline.url + "/v2/health/ready", timeout=5)
    assert ready.status_code == 200
    fs = ready.json()["feature_store"]
    assert fs["configured"] is False and "inline features only" in fs["mode"]
    assert "inline features only" in requests.get(
        env.inline.url + "/v1/models", timeout=5).json()["feature_store"]["mode"]
    d = _devices(env, 1)[0]
    r = _post(env.inline, PREDICT, {"entities": {"device_id": d}, "instances": [{}]})
    assert r.status_code == 422 and r.json()["field"] == "entities"
    a = _ok(_post(env.inline, PREDICT, {"instances": [env.latest[d]]}))
    b = _ok(_post(env.warn, PREDICT, {"entities": {"device_id": d}, "instances": [{}]}))
    assert a["predictions"] == b["predictions"]


@dataclass
class Answer:
    server: str
    kind: str  # inline | entity
    status: int
    seconds: float
    warned: bool
    at: float


def test_redis_hung_killed_and_restarted(env: Env) -> None:
    """The last test of the module: it stops the module's Redis."""
    devices = _devices(env, 40, skip=200)
    want = {d: _ok(_post(env.inline, PREDICT, {"instances": [env.latest[d]]}))["predictions"]
            for d in devices[:5]}
    answers: list[Answer] = []
    stop = threading.Event()
    deadline_ms = 600

    def client(server: Server, name: str) -> None:
        sess = requests.Session()
        i = 0
        while not stop.is_set():
            d = devices[i % len(devices)]
            i += 1
            for kind, body in (("inline", {"instances": [env.latest[d]]}),
                               ("entity", {"entities": {"device_id": d}, "instances": [{}]})):
                t0 = time.perf_counter()
                r = sess.post(server.url + PREDICT, json=body, timeout=30,
                              headers={"X-Timeout-Ms": str(deadline_ms)})
                dt = time.perf_counter() - t0
                warned = r.status_code == 200 and "warnings" in r.json()
                answers.append(Answer(name, kind, r.status_code, dt, warned, time.monotonic()))
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(s, n), daemon=True)
               for s, n in ((env.warn, "warn"), (env.required, "required"))]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        # Hung (SIGSTOP): the store's own timeout (100 ms) bounds the warn server; the required
        # server's store timeout (1000 ms) is longer than a 200 ms request deadline, which wins.
        env.redis.proc.send_signal(signal.SIGSTOP)
        t_hung = time.monotonic()
        time.sleep(0.3)
        t0 = time.perf_counter()
        r = _post(env.required, PREDICT, {"entities": {"device_id": devices[0]},
                                          "instances": [{}]}, timeout_ms=200)
        hung_required = (r.status_code, time.perf_counter() - t0)
        time.sleep(0.5)
        env.redis.proc.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        time.sleep(0.3)
        # Killed.
        env.redis.kill()
        t_killed = time.monotonic()
        time.sleep(1.5)
        # Restarted on the same port, empty: loaded again.
        t_restart = time.monotonic()
        env.redis.start()
        load(env.redis.url, env.avazu)
        t_back = time.monotonic()
        # Back by itself (back-off of at most 2 s): entity requests answer without warnings.
        limit = time.monotonic() + 15
        while time.monotonic() < limit:
            recent = [a for a in list(answers) if a.kind == "entity" and a.at > t_back + 0.1]
            if {a.server for a in recent if a.status == 200 and not a.warned} == {"warn",
                                                                                  "required"}:
                break
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    inline = [a for a in answers if a.kind == "inline"]
    entity = [a for a in answers if a.kind == "entity"]
    assert len(inline) > 20 and len(entity) > 20
    # Requests that carry their features never noticed.
    assert {a.status for a in inline} == {200}, sorted({a.status for a in inline})
    # Nobody waited past the deadline (600 ms; slack for the contended machine).
    slow = [a for a in answers if a.seconds > deadline_ms / 1e3 + 0.4]
    assert not slow, slow[:5]
    # While Redis was down: warnings from one server, 503 from the other, nothing else.
    down = [a for a in entity
            if t_hung + 0.15 < a.at < t_cont or t_killed + 0.1 < a.at < t_restart]
    warn_down = [a for a in down if a.server == "warn"]
    req_down = [a for a in down if a.server == "required"]
    marks = {"hung": t_hung, "cont": t_cont, "killed": t_killed, "restart": t_restart}
    odd = [(a, {k: round(a.at - v, 3) for k, v in marks.items()})
           for a in warn_down if not (a.status == 200 and a.warned)]
    assert warn_down and not odd, odd[:5]
    assert req_down and {a.status for a in req_down} <= {503, 504}, req_down[:5]
    assert any(a.status == 503 for a in req_down if a.at > t_killed)
    # The request deadline bounded the wait for a hung Redis on the required server.
    assert hung_required[0] == 504 and hung_required[1] < 0.6, hung_required
    # Back: both servers answer entity requests from the store again, without a restart.
    after = [a for a in entity if a.at > t_back]
    assert any(a.status == 200 and not a.warned for a in after if a.server == "warn")
    assert any(a.status == 200 and not a.warned for a in after if a.server == "required")
    for d, p in want.items():
        got = _ok(_post(env.warn, PREDICT, {"entities": {"device_id": d}, "instances": [{}]}))
        assert got["predictions"] == p and "warnings" not in got
    assert env.warn.metric("lma_feature_store_errors_total") > 0
    assert env.warn.metric("lma_feature_store_up") == 1
    fs = requests.get(env.warn.url + "/v2/health/ready", timeout=5).json()["feature_store"]
    assert fs["reachable"] is True and fs["last_error"]
