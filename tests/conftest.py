"""Shared fixtures.

``shared_data``: the folder of real Criteo/Avazu sample rows (``$LMA_SHARED_DATA``, else
``../shared/data`` relative to the repository root). Tests that use it are skipped, with the
reason, where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    env = os.environ.get("LMA_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the real-data folder (has criteo/ and avazu/), or skip the test."""
    root = shared_data_root()
    if not (root / "criteo").is_dir() and not (root / "avazu").is_dir():
        pytest.skip(f"real data samples not found at {root} (set LMA_SHARED_DATA to their folder)")
    return root


# The service's end-to-end fixtures (trained bundle, real Criteo rows, uvicorn processes).
from tests.service_fixtures import (  # noqa: E402, F401
    criteo_bundle,
    criteo_bundle_v2,
    criteo_rows,
    model_repo,
    ort_server,
    redis_server,
    torch_server,
)
