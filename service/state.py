"""What the routes share: settings, the model registry, metrics, the feature source; and the
steps every prediction route takes (resolve the model, the request's deadline, score)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request

from service.batcher import DeadlineExceeded, QueueFull, ShuttingDown
from service.decoding import FeatureSource
from service.errors import RequestError
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry
from service.settings import ServeSettings

TIMEOUT_HEADER = "x-timeout-ms"


@dataclass
class AppState:
    settings: ServeSettings
    registry: ModelRegistry
    metrics: Metrics
    feature_source: FeatureSource | None = None
    started: float = 0.0
    # One reload/unload at a time per model (see service.reload).
    model_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # The prediction cache (service.cache.PredictionCache) when LMA_SERVE_CACHE_TTL_S > 0.
    cache: Any = None


def get_state(request: Request) -> AppState:
    return request.app.state.lma


State = Annotated[AppState, Depends(get_state)]


def resolve(state: AppState, name: str, version: str | None = None) -> LoadedModel:
    model = state.registry.get(name, version)
    if model is not None:
        return model
    if name in state.registry.names():
        raise RequestError(404, f"model {name!r} has no version {version!r} (versions: "
                           f"{state.registry.versions(name)})", field="version", kind="unknown_version")
    if not state.registry.ready and any(s.name == name for s in state.registry.sources):
        if state.registry.error:
            raise RequestError(503, f"model {name!r} could not be loaded: "
                               f"{state.registry.error}", kind="not_ready")
        raise RequestError(503, f"model {name!r} is still loading", kind="not_ready",
                           headers={"Retry-After": "1"})
    raise RequestError(404, f"unknown model {name!r} (models: {state.registry.names()})",
                       field="model", kind="unknown_model")


def deadline(state: AppState, headers: Any, override_ms: float | None = None) -> float:
    """The request's deadline (``time.monotonic()``): its own (header or body), capped, or the
    default."""
    ms = override_ms
    raw = headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            ms = float(raw)
        except ValueError:
            raise RequestError(400, f"X-Timeout-Ms {raw!r} is not a number",
                               field="X-Timeout-Ms") from None
        if not ms > 0 or ms != ms:
            raise RequestError(400, "X-Timeout-Ms must be a positive number of milliseconds",
                               field="X-Timeout-Ms")
    default = state.settings.timeout_ms
    ms = default if ms is None else min(ms, default * 10)
    return time.monotonic() + ms / 1000.0


async def score(state: AppState, model: LoadedModel, dense: np.ndarray, tokens: np.ndarray,
                until: float) -> np.ndarray:
    """Logits (N,) float32 of the rows: from the prediction cache where it holds them, the rest
    through the model's batcher."""
    if state.cache is None:
        logits = await _run_model(model, dense, tokens, until)
    else:
        logits = await state.cache.score(
            model.name, model.version, model.fingerprint, dense, tokens, until,
            lambda d, t: _run_model(model, d, t, until))
    state.metrics.rows_scored.labels(model.name).inc(len(logits))
    return logits


async def _run_model(model: LoadedModel, dense: np.ndarray, tokens: np.ndarray, until: float
                     ) -> np.ndarray:
    try:
        logits = await model.batcher.submit(dense, tokens, until)
    except QueueFull as exc:
        raise RequestError(503, str(exc), kind="queue_full",
                           headers={"Retry-After": str(max(1, round(exc.retry_after_s)))}) from None
    except DeadlineExceeded as exc:
        raise RequestError(504, str(exc), kind="deadline") from None
    except ShuttingDown as exc:
        raise RequestError(503, str(exc), kind="shutting_down",
                           headers={"Retry-After": "1"}) from None
    return logits


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64, as ``lma predict`` computes them."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
