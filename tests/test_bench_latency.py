"""scripts/bench_latency.py's requests are what the service expects, and scripts/latency_app.py
still finds the stages it times (it fails loudly when the routers change)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latency_app_patches_the_routers() -> None:
    # In a subprocess: the import patches the routers' module globals.
    code = (
        "import latency_app, service.routers.v1 as v1, service.routers.v2 as v2; "
        "assert v1.rows_to_arrays.__wrapped__ and v2.v2_to_arrays.__wrapped__"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT / "scripts",
        env={"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_request_forms_encode_alike(shared_data) -> None:
    pytest.importorskip("fastapi")
    from lma.records import RecordEncoder
    from lma.schema import criteo_schema
    from service.decoding import (
        decode_v1,
        decode_v2,
        parse_json,
        rows_to_arrays,
        split_binary,
        v2_to_arrays,
    )

    if not (shared_data / "criteo" / "train_10k.tsv").is_file():
        pytest.skip("Criteo sample not found")
    bench = _script("bench_latency")
    schema = criteo_schema(labelled=False)
    enc = RecordEncoder(schema)
    rows = bench._rows(100)
    requests, merged = bench._requests(schema, rows)
    _, body, _ = requests["v1 json"]
    req = decode_v1(parse_json(body), 10_000)
    d1, t1 = rows_to_arrays(enc, req.rows, req.where)
    for form in ("v2 raw", "v2 encoded"):
        _, body, headers = requests[form]
        head, tail = split_binary(body, headers["Inference-Header-Content-Length"])
        d2, t2 = v2_to_arrays(decode_v2(head, tail, 10_000, 1024), enc, False)
        np.testing.assert_array_equal(t2, t1)
        np.testing.assert_array_equal(d2, d1)
    ref = enc.encode(merged)
    np.testing.assert_array_equal(ref.tokens, t1)
