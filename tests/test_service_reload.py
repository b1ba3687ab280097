"""Hot reload against a real uvicorn process: the admin routes' token, a new version swapped in
while client threads keep sending requests, and a tampered version refused."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.service_fixtures import MODEL, Server, publish_version

pytestmark = pytest.mark.slow

TOKEN = "reload-test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_PATHS = (f"/v1/models/{MODEL}/reload", f"/v2/repository/models/{MODEL}/load",
               f"/v2/repository/models/{MODEL}/unload")
N = 16


@pytest.fixture(scope="module")
def admin_server(criteo_bundle: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("reload_repo")
    shutil.copytree(criteo_bundle, repo / MODEL / "1")
    s = Server(str(repo), repo.parent / "reload.log", admin_token=TOKEN).wait_ready()
    s.model_dir = repo / MODEL  # type: ignore[attr-defined]
    yield s
    s.stop()


def _predict(server: Server, rows: list[dict], session: requests.Session | None = None
             ) -> requests.Response:
    return (session or requests).post(f"{server.url}/v1/models/{MODEL}:predict",
                                      json={"instances": rows}, timeout=30)


def test_admin_routes_need_the_token(admin_server, ort_server, criteo_rows):
    for path in ADMIN_PATHS:
        r = requests.post(admin_server.url + path, timeout=10)
        assert r.status_code == 401, r.text
        assert "Bearer" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        r = requests.post(admin_server.url + path, headers={"Authorization": f"Basic {TOKEN}"},
                          timeout=10)
        assert r.status_code == 401, r.text
        r = requests.post(admin_server.url + path,
                          headers={"Authorization": f"Bearer {TOKEN[:-1]}x"}, timeout=10)
        assert r.status_code == 403 and "wrong bearer token" in r.json()["error"]
        # A server started without LMA_ADMIN_TOKEN has them off, whatever the request carries.
        r = requests.post(ort_server.url + path, headers=AUTH, timeout=10)
        assert r.status_code == 404 and "LMA_ADMIN_TOKEN" in r.json()["error"], r.text
    # Broadcasting needs a reload channel, which this server has not.
    r = requests.post(f"{admin_server.url}/v1/models/{MODEL}/reload?broadcast=true",
                      headers=AUTH, timeout=10)
    assert r.status_code == 409 and "LMA_SERVE_RELOAD_CHANNEL" in r.json()["error"], r.text
    # Nothing was unloaded by the refused requests.
    r = _predict(admin_server, criteo_rows.records[:N])
    assert r.status_code == 200 and r.json()["version"] == "1"
    assert admin_server.metric("lma_errors_total", type="forbidden", status="403") >= 3


def test_a_tampered_version_is_refused(admin_server, criteo_rows, criteo_bundle_v2):
    serving = requests.get(f"{admin_server.url}/v1/models/{MODEL}", timeout=5).json()["version"]
    assert serving == "1", "run before the reload test (file order)"
    before = admin_server.metric("lma_reload_failures_total", model=MODEL, stage="open")
    bad = publish_version(criteo_bundle_v2, admin_server.model_dir, "2", tamper=True)
    try:
        r = requests.post(f"{admin_server.url}/v2/repository/models/{MODEL}/load", headers=AUTH,
                          timeout=60)
        assert r.status_code == 409, r.text
        body = r.json()
        assert "weights.safetensors" in body["error"] and "changed after export" in body["error"]
        assert body["serving"] == "1" and body["loaded"] is None and body["unloaded"] == []
        assert [x["version"] for x in body["refused"]] == ["2"]
        assert admin_server.metric("lma_reload_failures_total", model=MODEL,
                                   stage="open") == before + 1
        r = _predict(admin_server, criteo_rows.records[:N])
        assert r.status_code == 200 and r.json()["version"] == "1"
        np.testing.assert_allclose(r.json()["predictions"], criteo_rows.expected[:N], atol=1e-6)
    finally:
        shutil.rmtree(bad)


def test_reload_under_load(admin_server, criteo_rows, criteo_bundle_v2):
    from lma.predictor import Predictor

    rows = criteo_rows.records[:N]
    want = {"1": criteo_rows.expected[:N],
            "2": Predictor.open(criteo_bundle_v2).predict(criteo_rows.dense[:N], criteo_rows.tokens[:N])}
    assert np.max(np.abs(want["1"] - want["2"])) > 1e-3, "the two versions must answer differently"
    reloads = admin_server.metric("lma_reloads_total", model=MODEL)
    stop = threading.Event()
    results: list[tuple[float, int | None, object]] = []

    def client() -> None:
        with requests.Session() as sess:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = _predict(admin_server, rows, sess)
                    results.append((t0, r.status_code, r.json() if r.ok else r.text))
                except requests.RequestException as exc:
                    results.append((t0, None, repr(exc)))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        publish_version(criteo_bundle_v2, admin_server.model_dir, "2")
        r = requests.post(f"{admin_server.url}/v1/models/{MODEL}/reload", headers=AUTH,
                          timeout=120)
        swapped = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loaded"]["version"] == "2" and body["unloaded"] == ["1"] and body["serving"] == "2"
    assert body["loaded"]["load_seconds"] > 0 and body["loaded"]["warmup_seconds"] > 0
    failed = [x for x in results if x[1] != 200]
    assert not failed, failed[:3]
    seen = {"1": 0, "2": 0}
    for t0, _, ans in results:
        assert isinstance(ans, dict)
        v = ans["version"]
        assert v in want, v
        np.testing.assert_allclose(ans["predictions"], want[v], atol=1e-6, rtol=0)
        seen[v] += 1
        if t0 > swapped:
            assert v == "2"
    assert seen["1"] > 0 and seen["2"] > 0, seen
    assert sum(t0 > swapped for t0, _, _ in results) > 0
    info = requests.get(f"{admin_server.url}/v1/models/{MODEL}", timeout=5).json()
    assert info["version"] == "2" and info["versions"] == ["2"]
    r = requests.post(f"{admin_server.url}/v1/models/{MODEL}/versions/1:predict",
                      json={"instances": rows}, timeout=10)
    assert r.status_code == 404
    assert admin_server.metric("lma_reloads_total", model=MODEL) == reloads + 1
    assert admin_server.metric("lma_reload_triggers_total", model=MODEL, trigger="admin",
                               outcome="loaded") == 1
    assert admin_server.metric("lma_unloads_total", model=MODEL) >= 1

    # Nothing newer: a second reload changes nothing. Unload, then load again from the folder.
    r = requests.post(f"{admin_server.url}/v1/models/{MODEL}/reload", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["loaded"] is None and r.json()["serving"] == "2"
    r = requests.post(f"{admin_server.url}/v2/repository/models/{MODEL}/unload", headers=AUTH,
                      timeout=60)
    assert r.status_code == 200 and r.json()["unloaded"] == ["2"], r.text
    assert _predict(admin_server, rows).status_code == 404
    r = requests.post(f"{admin_server.url}/v2/repository/models/{MODEL}/load", headers=AUTH,
                      timeout=60)
    assert r.status_code == 200 and r.json()["loaded"]["version"] == "2", r.text
    r = _predict(admin_server, rows)
    assert r.status_code == 200 and r.json()["version"] == "2"
    np.testing.assert_allclose(r.json()["predictions"], want["2"], atol=1e-6, rtol=0)


def test_drain_waits_for_requests_in_flight(criteo_bundle):
    """A retired version closes only after the requests that resolved it have answered: one held
    across the drain still scores on the open batcher, and the drain ends when it lets go (the
    e2e test above rarely hits the window between resolving a model and submitting to it)."""
    import asyncio

    from service.batcher import ShuttingDown
    from service.registry import ModelRegistry, discover, sample_rows
    from service.settings import ServeSettings

    async def main() -> None:
        reg = ModelRegistry(ServeSettings(models=[str(criteo_bundle)], threads=1))
        (src,) = discover(criteo_bundle)
        model = reg.open(src)
        d, t = sample_rows(model, 8)
        far = time.monotonic() + 60
        with model.hold():
            drain = asyncio.create_task(model.drain())
            await asyncio.sleep(0.2)
            assert not drain.done()
            got = await model.batcher.submit(d, t, far)
            np.testing.assert_allclose(got, model.bundle.sample()["logits"][:8], atol=1e-4)
        await asyncio.wait_for(drain, 30)
        with pytest.raises(ShuttingDown):
            await model.batcher.submit(d, t, far)

    asyncio.run(main())
