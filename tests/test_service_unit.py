"""The service's parts in-process: the batcher, decoding, discovery, and the torch-free import."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lma.features import encode_table
from lma.records import RecordEncoder
from lma.schema import criteo_schema
from service.batcher import DeadlineExceeded, MicroBatcher, QueueFull
from service.decoding import encode_rows
from service.errors import RequestError
from service.registry import discover

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A model that records the batch sizes it was called with; logit = dense[:, 0]."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(len(tokens))
        time.sleep(self.delay)
        return dense[:, 0].copy()


def _rows(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.arange(start, start + n, dtype=np.float32)[:, None]
    return d, np.zeros((n, 2), np.int64)


def test_batcher_coalesces_concurrent_requests_and_keeps_order():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_rows=100, max_wait_ms=50)
        far = time.monotonic() + 10
        outs = await asyncio.gather(*(b.submit(*_rows(10 * i, 10), far) for i in range(5)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert rec.calls == [50]
    for i, o in enumerate(outs):
        np.testing.assert_array_equal(o, np.arange(10 * i, 10 * i + 10, dtype=np.float32))


def test_batcher_splits_large_requests_and_caps_batches():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_rows=16, max_wait_ms=1)
        out = await b.submit(*_rows(0, 40), time.monotonic() + 10)
        await b.close()
        return out

    out = asyncio.run(main())
    assert rec.calls == [16, 16, 8]
    np.testing.assert_array_equal(out, np.arange(40, dtype=np.float32))


def test_batcher_queue_full_and_deadline():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_rows=100, max_wait_ms=200, max_queue_rows=10)
        first = asyncio.ensure_future(b.submit(*_rows(0, 8), time.monotonic() + 5))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(*_rows(0, 5), time.monotonic() + 5)
        with pytest.raises(DeadlineExceeded):
            await b.submit(*_rows(0, 1), time.monotonic() + 0.05)
        await first
        await b.close()

    asyncio.run(main())
    assert rec.calls == [8]  # the expired request was dropped before compute


def test_batcher_close_finishes_queued_requests():
    rec = Recorder(delay=0.05)

    async def main():
        b = MicroBatcher(rec, max_batch_rows=4, max_wait_ms=0)
        pending = [asyncio.ensure_future(b.submit(*_rows(i, 4), time.monotonic() + 10))
                   for i in range(3)]
        await asyncio.sleep(0)
        await b.close()
        return await asyncio.gather(*pending)

    outs = asyncio.run(main())
    assert len(outs) == 3 and rec.calls == [4, 4, 4]


def test_json_rows_encode_like_the_criteo_reader(shared_data):
    """Rows sent as JSON (numbers for dense fields, strings for categoricals, missing cells
    left out) encode exactly as the reader encodes the same lines."""
    from lma.data import open_source

    path = shared_data / "criteo" / "test_10k_unlabeled.tsv"
    with open(path) as f:
        lines = [next(f) for _ in range(200)]
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    rows = []
    for line in lines:
        cells = line.rstrip("\n").split("\t")
        rows.append({n: (int(v) if n[0] == "I" else v) for n, v in zip(names, cells, strict=True)
                     if v != ""})
    enc = encode_rows(RecordEncoder(criteo_schema(labelled=False)), rows)
    assert enc.errors == [] and enc.unknown == []
    dense, tokens = enc.dense, enc.tokens
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".tsv") as t:
        t.write("".join(lines))
        t.flush()
        want = open_source(f"criteo-test:{t.name}").read_all()
    np.testing.assert_array_equal(tokens, want.tokens)
    np.testing.assert_allclose(dense, want.dense, rtol=0, atol=0)


def test_categorical_json_values_are_canonicalised():
    schema = criteo_schema(labelled=False)
    table = pa.table({**{f"I{i}": pa.array([None] * 3, pa.string()) for i in range(1, 14)},
                      **{f"C{i}": pa.array(["5", "-3", "0.25"]) for i in range(1, 27)}})
    want = encode_table(schema, table).tokens
    for values in ([5, -3, 0.25], [5.0, -3.0, 0.25], ["5", "-3", "0.25"]):
        rows = [{"C1": v} for v in values]
        enc = encode_rows(RecordEncoder(schema), rows)
        assert enc.errors == []
        np.testing.assert_array_equal(enc.tokens[:, 0], want[:, 0])


def test_bad_values_name_row_and_field():
    schema = criteo_schema(labelled=False)
    rows = [{"I1": 1}, {"I2": "x", "C3": [1]}, {"C4": True, "I5": float("inf")}]
    enc = encode_rows(RecordEncoder(schema), rows)
    assert sorted((e.row, e.field) for e in enc.errors) == [(1, "C3"), (1, "I2"), (2, "C4"),
                                                            (2, "I5")]


def test_discover_repository_layouts(tmp_path):
    for rel in ("repo/a/1", "repo/a/2", "repo/b"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "manifest.json").write_text('{"model": {"name": "x", "version": "7"}}')
    found = sorted((s.name, s.version) for s in discover(tmp_path / "repo"))
    assert found == [("a", "1"), ("a", "2"), ("b", "7")]
    assert [(s.name, s.version) for s in discover(tmp_path / "repo" / "a")] == [("a", "1"), ("a", "2")]
    assert [(s.name, s.version) for s in discover(tmp_path / "repo" / "b")] == [("x", "7")]
    with pytest.raises(FileNotFoundError):
        discover(tmp_path)


def test_request_error_body_names_field_and_row():
    e = RequestError(422, "bad", field="I1", row=3)
    assert e.body() == {"error": "bad", "field": "I1", "row": 3}


def test_import_service_main_with_onnxruntime_loads_no_torch():
    code = ("import sys\nimport service.main, service.backends.onnxruntime, service.cli\n"
            "print(sorted(m for m in ('torch', 'onnx', 'lma.train', 'lma.checkpoint') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_settings_from_environment(monkeypatch):
    from service.settings import ServeSettings

    monkeypatch.setenv("LMA_SERVE_MODELS", "/a, /b")
    monkeypatch.setenv("LMA_SERVE_MAX_WAIT_MS", "5")
    monkeypatch.setenv("LMA_SERVE_BACKEND", "torch")
    s = ServeSettings()
    assert s.models == ["/a", "/b"] and s.max_wait_ms == 5 and s.backend == "torch"
    monkeypatch.setenv("LMA_SERVE_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="backend"):
        ServeSettings()


def test_batcher_without_wait_batches_what_arrives_while_busy():
    """max_wait_ms=0: a lone request runs at once; those that arrive while the model computes
    run together next."""
    rec = Recorder(delay=0.1)

    async def main():
        b = MicroBatcher(rec, max_batch_rows=100, max_wait_ms=0)
        far = time.monotonic() + 10
        first = asyncio.ensure_future(b.submit(*_rows(0, 2), far))
        await asyncio.sleep(0.03)  # the first batch is computing
        rest = [asyncio.ensure_future(b.submit(*_rows(10 * i, 3), far)) for i in range(1, 4)]
        await asyncio.gather(first, *rest)
        await b.close()

    asyncio.run(main())
    assert rec.calls == [2, 9]


def test_binary_bytes_tensors_decode_like_tritonclient_encodes_them():
    from tritonclient.utils import serialize_byte_tensor

    from service.decoding import _bytes_elements

    def ser(values):
        s = serialize_byte_tensor(np.array([v.encode() for v in values], dtype=np.object_))
        return s.item() if s.dtype == object else s.tobytes()

    for values in (["68fd1e64", "", "é★x", "abc", ""], [f"{i:08x}" for i in range(300)],
                   ["", ""], ["x"]):
        raw = ser(values)
        assert _bytes_elements(raw, len(values), "C1", 1024).to_pylist() == values
    same = ser(["aaaa", "bbbb", "cccc"])
    with pytest.raises(RequestError, match="not UTF-8"):
        _bytes_elements(same[:-1] + b"\xff", 3, "C1", 1024)
    with pytest.raises(RequestError, match="cut off|remain"):
        _bytes_elements(same[:-2], 3, "C1", 1024)
    with pytest.raises(RequestError, match="left after"):
        _bytes_elements(same + b"x", 3, "C1", 1024)
    with pytest.raises(RequestError, match="longer than 2 bytes"):
        _bytes_elements(same, 3, "C1", 2)
