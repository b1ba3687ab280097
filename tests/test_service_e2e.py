"""The service end to end: real uvicorn processes serving a Criteo-trained LMA bundle, real
Criteo test rows, real clients (requests, tritonclient)."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.service_fixtures import MODEL

pytestmark = pytest.mark.slow


def _predict(server, body, **kw):
    return requests.post(f"{server.url}/v1/models/{MODEL}:predict", json=body, timeout=30, **kw)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_v1_predictions_equal_lma_predict(backend, request, criteo_rows):
    server = request.getfixturevalue("ort_server" if backend == "onnxruntime" else "torch_server")
    r = _predict(server, {"instances": criteo_rows.records})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["version"] == "1"
    got = np.asarray(body["predictions"])
    assert got.shape == criteo_rows.expected.shape
    np.testing.assert_allclose(got, criteo_rows.expected, atol=1e-6, rtol=0)
    info = requests.get(f"{server.url}/v1/models/{MODEL}", timeout=5).json()
    assert info["backend"] == backend
    assert info["kind"] == "lma"
    want = "CPUExecutionProvider" if backend == "onnxruntime" else "torch:cpu"
    assert want in info["providers"]
    if backend == "torch":
        assert info["engine"] == "program"


def test_ranking_form_and_top_k(ort_server, criteo_rows):
    rows = criteo_rows.records[:20]
    context = {k: v for k, v in rows[0].items() if k.startswith("I")}
    candidates = [{k: v for k, v in r.items() if k.startswith("C")} for r in rows]
    # A candidate value wins over the context's.
    candidates[3]["I1"] = 1000
    r = _predict(ort_server, {"context": context, "candidates": candidates, "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    merged = [{**context, **c} for c in candidates]
    plain = _predict(ort_server, {"instances": merged}).json()["predictions"]
    np.testing.assert_allclose(body["predictions"], plain, atol=1e-12)
    order = np.argsort(-np.asarray(plain), kind="stable")[:5]
    assert body["top_k"]["indices"] == order.tolist()
    np.testing.assert_allclose(body["top_k"]["scores"], np.asarray(plain)[order], atol=1e-12)
    # top_k larger than the candidates lists them all.
    r = _predict(ort_server, {"candidates": candidates[:3], "top_k": 10})
    assert len(r.json()["top_k"]["indices"]) == 3


def test_v2_tritonclient_binary_and_json(ort_server, criteo_rows):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(ort_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert [i["name"] for i in meta["inputs"]] == ["dense", "tokens"]
    n = 64
    dense, tokens = criteo_rows.dense[:n], criteo_rows.tokens[:n]
    expected = criteo_rows.expected[:n]
    for binary in (True, False):
        d = httpclient.InferInput("dense", list(dense.shape), "FP32")
        d.set_data_from_numpy(dense, binary_data=binary)
        t = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
        t.set_data_from_numpy(tokens, binary_data=binary)
        out = httpclient.InferRequestedOutput("probability", binary_data=binary)
        res = client.infer(MODEL, [d, t], outputs=[out], request_id=f"req-{binary}")
        assert res.get_response()["id"] == f"req-{binary}"
        np.testing.assert_allclose(res.as_numpy("probability"), expected, atol=1e-6)
    # Raw features as one tensor per field: BYTES for categoricals ("" is missing), INT64 for
    # dense fields (a numeric tensor has no missing value: rows with every dense field).
    idx = [i for i, r in enumerate(criteo_rows.records) if all(f"I{k}" in r for k in range(1, 14))]
    assert len(idx) >= 10
    rows = [criteo_rows.records[i] for i in idx]
    inputs = []
    for i in range(1, 14):
        x = httpclient.InferInput(f"I{i}", [len(rows)], "INT64")
        x.set_data_from_numpy(np.array([r[f"I{i}"] for r in rows], np.int64))
        inputs.append(x)
    for i in range(1, 27):
        x = httpclient.InferInput(f"C{i}", [len(rows)], "BYTES")
        x.set_data_from_numpy(np.array([r.get(f"C{i}", "").encode() for r in rows], np.object_))
        inputs.append(x)
    res = client.infer(MODEL, inputs)  # no outputs named: every output comes back in binary
    np.testing.assert_allclose(res.as_numpy("probability"), criteo_rows.expected[idx], atol=1e-6)
    client.close()


def test_metadata_and_readiness(ort_server):
    assert requests.get(f"{ort_server.url}/v2/health/live", timeout=5).status_code == 200
    assert requests.get(f"{ort_server.url}/v2/health/ready", timeout=5).json()["ready"] is True
    meta = requests.get(f"{ort_server.url}/v2/models/{MODEL}/versions/1", timeout=5).json()
    assert meta["inputs"][1] == {"name": "tokens", "datatype": "INT64", "shape": [-1, 26]}
    models = requests.get(f"{ort_server.url}/v1/models", timeout=5).json()["models"]
    (m,) = models
    assert m["embedding_memory"]["location"] == "host"
    assert m["bytes"]["embedding"] > 0 and m["bytes"]["key_lookup"] > 0
    assert m["load_seconds"] > 0 and m["warmup_seconds"] > 0
    assert requests.get(f"{ort_server.url}/docs", timeout=5).status_code == 200
    spec = requests.get(f"{ort_server.url}/openapi.json", timeout=5).json()
    assert "/v1/models/{name}:predict" in spec["paths"]


def test_metrics_count_what_happened(ort_server, criteo_rows):
    route = "/v1/models/{name}:predict"
    before_rows = ort_server.metric("lma_rows_scored_total", model=MODEL)
    before_ok = ort_server.metric("lma_request_seconds_count", route=route, model=MODEL, status="200")
    before_bad = ort_server.metric("lma_errors_total", type="bad_value", status="422")
    for _ in range(3):
        assert _predict(ort_server, {"instances": criteo_rows.records[:7]}).status_code == 200
    assert _predict(ort_server, {"instances": [{"I1": "abc"}]}).status_code == 422
    assert ort_server.metric("lma_rows_scored_total", model=MODEL) == before_rows + 21
    assert ort_server.metric("lma_request_seconds_count", route=route, model=MODEL,
                             status="200") == before_ok + 3
    assert ort_server.metric("lma_errors_total", type="bad_value", status="422") == before_bad + 1
    assert ort_server.metric("lma_batch_rows_count", model=MODEL) > 0
    assert ort_server.metric("lma_compute_seconds_count", model=MODEL) > 0


def test_a_tampered_bundle_keeps_the_server_unready(criteo_bundle, tmp_path):
    """Readiness is 503 (with the reason) until every model is loaded and warm; a bundle whose
    file was changed after export never gets there, while liveness still answers."""
    import shutil
    import time

    from tests.service_fixtures import Server

    bad = tmp_path / "bad"
    shutil.copytree(criteo_bundle, bad)
    with open(bad / "sample.npz", "ab") as f:
        f.write(b"\0")
    s = Server(str(bad), tmp_path / "bad.log")
    try:
        t_end = time.monotonic() + 60
        body = {}
        while time.monotonic() < t_end:
            try:
                r = requests.get(f"{s.url}/v2/health/ready", timeout=2)
                body = r.json()
                if "error" in body:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.2)
        assert r.status_code == 503
        assert "sample.npz" in body["error"] and "changed after export" in body["error"]
        assert requests.get(f"{s.url}/v2/health/live", timeout=2).status_code == 200
        r = requests.post(f"{s.url}/v1/models/{MODEL}:predict", json={"instances": [{}]},
                          timeout=5)
        assert r.status_code == 503 and "could not be loaded" in r.json()["error"]
    finally:
        s.stop()


def test_lma_serve_with_two_workers(model_repo, tmp_path):
    """`lma serve REPO --workers 2`: options reach every worker through LMA_SERVE_*; each worker
    answers; SIGTERM stops them all."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.service_fixtures import REPO_ROOT, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMA_SERVE_")}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "lma.cli", "-q", "serve", str(model_repo), "--port", str(port),
         "--workers", "2", "--threads", "1", "--max-rows", "5", "--log-level", "warning"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 120
        ready = 0
        while time.monotonic() < t_end and ready < 10:
            try:  # new connections, spread over both workers
                ready = ready + 1 if requests.get(f"{url}/v2/health/ready", timeout=2).ok else 0
            except (requests.ConnectionError, requests.Timeout):
                ready = 0
            time.sleep(0.2)
        assert ready >= 10, (tmp_path / "serve.log").read_text()
        for _ in range(6):
            r = requests.post(f"{url}/v1/models/{MODEL}:predict",
                              json={"instances": [{"I1": 1}] * 6}, timeout=10)
            assert r.status_code == 413 and "LMA_SERVE_MAX_ROWS" in r.json()["error"]
            assert requests.post(f"{url}/v1/models/{MODEL}:predict",
                                 json={"instances": [{"I1": 1}]}, timeout=10).ok
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    assert proc.returncode in (0, -15)
