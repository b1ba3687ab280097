"""The warm-up every model version passes before it serves: at startup and on a hot reload."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from service.decoding import rows_to_arrays
from service.registry import LoadedModel, sample_rows
from service.state import AppState

WARMUP_TOLERANCE = 1e-4


async def warm_up(state: AppState, model: LoadedModel) -> None:
    """A real batch through the whole path: raw rows through decoding and the batcher, then the
    bundle's sample rows, whose logits must match the ones saved at export."""
    s = state.settings
    n = min(s.warmup_rows, s.max_queue_rows)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for f in model.schema.dense_names:
        rows[0][f] = 1
    for f in model.schema.categorical_names:
        rows[0][f] = "warmup"
    dense, tokens = rows_to_arrays(model.encoder, rows, "warmup")
    far = time.monotonic() + 600.0
    await model.batcher.submit(dense, tokens, far)
    d, t = sample_rows(model, n)
    got = await model.batcher.submit(d, t, far)
    want = model.bundle.sample()["logits"][: len(t)]
    diff = float(np.max(np.abs(got - want))) if len(t) else 0.0
    if not diff <= WARMUP_TOLERANCE:
        raise RuntimeError(
            f"{model.path}: the {model.backend.name} backend's logits on the bundle's sample rows "
            f"differ from the exported ones by {diff:.3g} (> {WARMUP_TOLERANCE}); refusing to serve"
        )
