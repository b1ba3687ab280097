"""Limits and bad input against a real uvicorn process: each refusal a 4xx naming the field or
row, the server answering normally afterwards; dynamic batching, full queue and deadline."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.service_fixtures import MODEL, Server

pytestmark = pytest.mark.slow

P = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
J = {"content-type": "application/json"}
ROW = {"I1": 3, "I2": 20, "C1": "68fd1e64", "C2": "80e26c9b"}


def _v2(inputs, **extra):
    import orjson

    return orjson.dumps({"inputs": inputs, **extra})


def _tensor(name, shape, dtype, data):
    return {"name": name, "shape": shape, "datatype": dtype, "data": data}


DENSE_OK = _tensor("dense", [1, 13], "FP32", [0.5] * 13)
TOKENS_OK = _tensor("tokens", [1, 26], "INT64", [7] * 26)

# (case, method, path, body bytes or JSON, headers, status, a word the field/row must name)
CASES = [
    ("malformed JSON", P, b'{"instances": [', J, 400, None),
    ("empty body", P, b"", J, 400, None),
    ("body not an object", P, b"[1, 2]", J, 422, "body"),
    ("no instances key", P, b'{"rows": []}', J, 422, "instances"),
    ("empty instances", P, b'{"instances": []}', J, 422, "instances"),
    ("instances not a list", P, b'{"instances": {"I1": 1}}', J, 422, "instances"),
    ("a row that is not an object", P, b'{"instances": [{"I1": 1}, 5]}', J, 422, 1),
    ("unknown field", P, b'{"instances": [{"I1": 1}, {"I1": 2, "colour": "red"}]}', J, 422, "colour"),
    ("string in a dense field", P, b'{"instances": [{"I1": 1}, {"I3": "abc"}]}', J, 422, "I3"),
    ("object in a categorical field", P, b'{"instances": [{"C5": {"a": 1}}]}', J, 422, "C5"),
    ("list in a single-valued categorical field", P, b'{"instances": [{"C5": ["a"]}]}', J, 422, "C5"),
    ("boolean in a dense field", P, b'{"instances": [{"I2": true}]}', J, 422, "I2"),
    ("NaN literal", P, b'{"instances": [{"I1": NaN}]}', J, 400, None),
    ("Infinity literal", P, b'{"instances": [{"I1": Infinity}]}', J, 400, None),
    ("overflowing number", P, b'{"instances": [{"I1": 1e400}]}', J, 400, None),
    ("object in a dense field", P, b'{"instances": [{"I4": {"v": 1}}]}', J, 422, "I4"),
    ("huge string", P, b'{"instances": [{"C1": "' + b"x" * 5000 + b'"}]}', J, 422, "C1"),
    ("deep nesting", P, b'{"instances": [{"C1": ' + b"[" * 2000 + b"]" * 2000 + b"}]}", J, 400, None),
    ("wrong content type", P, b'{"instances": [{"I1": 1}]}', {"content-type": "text/plain"}, 415, "Content-Type"),
    ("unknown model", "/v1/models/nope:predict", b'{"instances": [{"I1": 1}]}', J, 404, "model"),
    ("unknown version", f"/v1/models/{MODEL}/versions/9:predict", b'{"instances": [{"I1": 1}]}', J, 404, "version"),
    ("too many rows", P, b'{"instances": [' + b",".join([b"{}"] * 10001) + b"]}", J, 413, "instances"),
    ("bad top_k", P, b'{"candidates": [{"I1": 1}], "top_k": 0}', J, 422, "top_k"),
    ("context not an object", P, b'{"context": 3, "candidates": [{}]}', J, 422, "context"),
    ("bad X-Timeout-Ms", P, b'{"instances": [{"I1": 1}]}', {**J, "x-timeout-ms": "soon"}, 400, "X-Timeout-Ms"),
    ("v2 malformed JSON", V2, b"{", J, 400, None),
    ("v2 no inputs", V2, b'{"inputs": []}', J, 400, "inputs"),
    ("v2 shape mismatch", V2, _v2([_tensor("dense", [1, 12], "FP32", [0.5] * 12), TOKENS_OK]), J, 400, "dense"),
    ("v2 datatype mismatch", V2, _v2([_tensor("dense", [1, 13], "FP64", [0.5] * 13), TOKENS_OK]), J, 400, "dense"),
    ("v2 data size mismatch", V2, _v2([_tensor("dense", [1, 13], "FP32", [0.5] * 12), TOKENS_OK]), J, 400, "dense"),
    ("v2 unknown datatype", V2, _v2([_tensor("dense", [1, 13], "FP33", [0.5] * 13), TOKENS_OK]), J, 400, "dense"),
    ("v2 rows disagree", V2, _v2([_tensor("dense", [2, 13], "FP32", [0.5] * 26), TOKENS_OK]), J, 400, "tokens"),
    ("v2 NaN in dense tensor", V2, None, None, 400, "dense"),
    ("v2 unknown input", V2, _v2([_tensor("colour", [1], "BYTES", ["red"])]), J, 422, "colour"),
    ("v2 string in dense feature", V2, _v2([_tensor("I1", [1], "BYTES", ["abc"])]), J, 422, "I1"),
    ("v2 binary size past the body", V2, None, None, 400, "dense"),
    ("v2 binary bytes left over", V2, None, None, 400, "Inference-Header-Content-Length"),
    ("v2 header length past the body", V2, None, None, 400, "Inference-Header-Content-Length"),
    ("v2 unknown output", V2, _v2([DENSE_OK, TOKENS_OK], outputs=[{"name": "cats"}]), J, 400, "outputs[0]"),
]


def _binary_case(case: str) -> tuple[bytes, dict]:
    import orjson

    dense = np.full((1, 13), 0.5, np.float32)
    tokens = np.full((1, 26), 7, np.int64)
    if case == "v2 NaN in dense tensor":
        dense[0, 4] = np.nan
    head = {"inputs": [
        {"name": "dense", "shape": [1, 13], "datatype": "FP32",
         "parameters": {"binary_data_size": dense.nbytes}},
        {"name": "tokens", "shape": [1, 26], "datatype": "INT64",
         "parameters": {"binary_data_size": tokens.nbytes}}]}
    tail = dense.tobytes() + tokens.tobytes()
    if case == "v2 binary size past the body":
        head["inputs"][0]["parameters"]["binary_data_size"] = 10_000
    if case == "v2 binary bytes left over":
        tail += b"\0" * 8
    h = orjson.dumps(head)
    length = len(h) + 10_000 if case == "v2 header length past the body" else len(h)
    return h + tail, {"inference-header-content-length": str(length),
                      "content-type": "application/octet-stream"}


@pytest.mark.parametrize("case,path,body,headers,status,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_4xx(ort_server, case, path, body, headers, status, names):
    if body is None:
        body, headers = _binary_case(case)
    r = requests.post(ort_server.url + path, data=body, headers=headers, timeout=30)
    assert r.status_code == status, (case, r.status_code, r.text[:500])
    err = r.json()
    assert isinstance(err["error"], str) and err["error"]
    if isinstance(names, int):
        assert err.get("row") == names, err
    elif names is not None:
        assert names in (err.get("field"), *(e.get("field") for e in err.get("errors", []))), err
    # Never a dead server: it answers a good request right after.
    ok = requests.post(ort_server.url + P, json={"instances": [ROW]}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_bad_rows_name_row_and_field(ort_server):
    r = requests.post(ort_server.url + P, json={"instances": [ROW, ROW, {"I4": "x", "C2": {}}]},
                      timeout=30)
    assert r.status_code == 422
    err = r.json()
    assert err["row"] == 2
    assert {(e["row"], e["field"]) for e in err["errors"]} == {(2, "I4"), (2, "C2")}


def test_unseen_values_and_equal_json_forms_are_valid(ort_server):
    """Values never seen in training take the fallback path; JSON 5, 5.0 and "5" in a
    categorical field are the CSV text 5."""
    rows = [{"C1": "never-seen-value", "C2": 5}, {"C2": 5.0}, {"C2": "5"}]
    r = requests.post(ort_server.url + P, json={"instances": rows}, timeout=30)
    assert r.status_code == 200, r.text
    p = r.json()["predictions"]
    assert p[1] == p[2]


def test_body_limit_counts_the_streamed_body(ort_server):
    """A chunked upload (no Content-Length) past the limit is refused with 413 too."""
    big = b'{"instances": [' + b",".join([b'{"C1": "' + b"a" * 1000 + b'"}'] * 20000) + b"]}"

    def chunks():
        for s in range(0, len(big), 1 << 16):
            yield big[s:s + (1 << 16)]

    r = requests.post(ort_server.url + P, data=chunks(), headers=J, timeout=60)
    assert r.status_code == 413, r.text[:300]
    r = requests.post(ort_server.url + P, data=big, headers=J, timeout=60)
    assert r.status_code == 413
    assert requests.post(ort_server.url + P, json={"instances": [ROW]}, timeout=30).ok


def test_client_gone_mid_body_leaves_server_healthy(ort_server):
    import time

    gone = ort_server.metric("lma_errors_total", type="client_disconnected", status="400")
    host, port = ort_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100000\r\n\r\n{\"instances\": [")
    assert requests.post(ort_server.url + P, json={"instances": [ROW]}, timeout=30).ok
    t_end = time.monotonic() + 5
    while time.monotonic() < t_end and ort_server.metric(
            "lma_errors_total", type="client_disconnected", status="400") == gone:
        time.sleep(0.05)
    assert ort_server.metric("lma_errors_total", type="client_disconnected", status="400") == gone + 1
    assert ort_server.metric("lma_errors_total", type="internal", status="500") == 0


# ---------------------------------------------------------------- batching, queue, deadline


@pytest.fixture(scope="module")
def slow_server(model_repo, tmp_path_factory):
    """Batches wait 500 ms for rows; the default deadline (150 ms) is shorter than that."""
    s = Server(str(model_repo), tmp_path_factory.mktemp("logs") / "slow.log", max_wait_ms=500,
               max_batch_rows=64, max_queue_rows=40, timeout_ms=150).wait_ready()
    yield s
    s.stop()


LONG = {**J, "x-timeout-ms": "1500"}


def _rows(n):
    return {"instances": [dict(ROW, I1=i) for i in range(n)]}


def test_concurrent_requests_run_as_one_batch(slow_server):
    batches = slow_server.metric("lma_batch_rows_count", model=MODEL)
    rows = slow_server.metric("lma_batch_rows_sum", model=MODEL)
    alone = requests.post(slow_server.url + P, json=_rows(5), headers=LONG, timeout=30).json()
    barrier = threading.Barrier(8)

    def send(_):
        barrier.wait()
        return requests.post(slow_server.url + P, json=_rows(5), headers=LONG, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    # One batch for the lone request, one for the eight concurrent ones.
    assert slow_server.metric("lma_batch_rows_count", model=MODEL) == batches + 2
    assert slow_server.metric("lma_batch_rows_sum", model=MODEL) == rows + 45
    assert slow_server.metric("lma_batch_rows_bucket", model=MODEL, le="64.0") - \
        slow_server.metric("lma_batch_rows_bucket", model=MODEL, le="32.0") >= 1
    # Each caller got its own rows back, in order.
    for a in answers:
        np.testing.assert_allclose(a.json()["predictions"], alone["predictions"], atol=1e-7)


def test_full_queue_answers_503_with_retry_after(slow_server):
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(requests.post, slow_server.url + P, json=_rows(30), headers=LONG,
                            timeout=30)
        import time

        t_end = time.monotonic() + 0.4  # the 30 rows wait for their batch (500 ms)
        while slow_server.metric("lma_queue_rows", model=MODEL) < 30 and time.monotonic() < t_end:
            time.sleep(0.01)
        second = requests.post(slow_server.url + P, json=_rows(20), headers=LONG, timeout=30)
        assert second.status_code == 503, second.text
        assert int(second.headers["retry-after"]) >= 1
        assert "queue" in second.json()["error"]
        assert first.result().status_code == 200
    assert slow_server.metric("lma_errors_total", type="queue_full", status="503") >= 1


def test_past_deadline_answers_504_without_compute(slow_server):
    computed = slow_server.metric("lma_batch_rows_sum", model=MODEL)
    r = requests.post(slow_server.url + P, json=_rows(3), headers=J, timeout=30)
    assert r.status_code == 504, r.text
    assert "deadline" in r.json()["error"]
    import time

    time.sleep(0.6)  # past the batch window: the dropped rows were never computed
    assert slow_server.metric("lma_batch_rows_sum", model=MODEL) == computed
    assert slow_server.metric("lma_errors_total", type="deadline", status="504") >= 1


def test_graceful_shutdown_answers_queued_requests(model_repo, tmp_path):
    """SIGTERM while requests wait for their batch: they are answered, then the process exits."""
    import time

    s = Server(str(model_repo), tmp_path / "stop.log", max_wait_ms=600).wait_ready()
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(requests.post, s.url + P, json=_rows(3), timeout=30)
                   for _ in range(4)]
        time.sleep(0.2)  # the requests are queued, their batch not yet run
        code = s.stop()
        answers = [p.result() for p in pending]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
    assert code in (0, -15), s.log.read_text()
    assert "Traceback" not in s.log.read_text()
