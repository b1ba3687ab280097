"""``uvicorn service.main:app``: settings from ``LMA_SERVE_*`` (see :mod:`service.settings`).

Startup finds the bundles (failing at once on a bad path), then loads and warms them in the
background: liveness answers at once, readiness 503 until every model has scored a real batch.
Shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections and waits for open requests,
then every model's queue is drained before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.app import create_app
from service.cache import open_cache
from service.feature_store import open_feature_source
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.reload import start_triggers
from service.settings import ServeSettings
from service.state import AppState
from service.warmup import warm_up

logger = logging.getLogger("service")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = ServeSettings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    registry.discover_all()
    state = AppState(settings, registry, metrics, started=time.time(),
                     feature_source=open_feature_source(settings, metrics))
    app.state.lma = state
    state.cache = open_cache(settings, metrics)
    loading = asyncio.create_task(registry.load_all(lambda m: warm_up(state, m)))
    triggers = start_triggers(state)
    try:
        yield
    finally:
        await triggers.stop()
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        if state.cache is not None:
            await state.cache.close()
        await registry.close()
        if state.feature_source is not None:
            await state.feature_source.close()
        logger.info("models closed; queued requests were answered")


app = create_app(lifespan)
