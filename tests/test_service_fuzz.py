"""A property-based fuzz of the running server from its own OpenAPI schema (schemathesis):
bounded in examples and time, it must find no 5xx answer, and the server must still answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.service_fixtures import MODEL

pytestmark = pytest.mark.slow


def test_openapi_fuzz_finds_no_server_error(ort_server, tmp_path):
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (the dev extra installs it)")
    config = tmp_path / "schemathesis.toml"
    # Path parameters name the served model, so request bodies reach decoding and the model.
    config.write_text(f'[parameters]\n"path.name" = "{MODEL}"\n"path.version" = "1"\n')
    out = subprocess.run(
        [exe, "--config-file", str(config), "run", f"{ort_server.url}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "8", "--max-time", "20",
         "--seed", "1", "--no-shrink", "--workers", "1", "--request-timeout", "10"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its cache stays out of the repo
    summary = out.stdout[-3000:]
    assert out.returncode == 0, summary + out.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary.split("SUMMARY")[-1], summary
    assert ort_server.metric("lma_errors_total", type="internal", status="500") == 0
    ok = requests.post(f"{ort_server.url}/v1/models/{MODEL}:predict",
                       json={"instances": [{"I1": 1}]}, timeout=10)
    assert ok.status_code == 200
