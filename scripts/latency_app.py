"""``service.main:app`` with a per-request timing breakdown in a ``Server-Timing`` header.

For scripts/bench_latency.py only (``uvicorn latency_app:app --app-dir scripts``): the same app,
settings and code path, with the routers' module-level references to their stages (body read,
parse, feature encoding, scoring, response) wrapped in timers, and the batcher's per-batch
statistics (queue wait, compute) kept for the request that is waiting on them. Requests must come
one at a time (low load): the batch statistics are those of the last batch.

Server-Timing entries, in ms: ``body``, ``parse``, ``encode``, ``score`` (queue wait + compute +
the hops to and from the model thread), ``queue``, ``compute``, ``response`` (building and
serialising the answer; v2: everything after scoring), ``total`` (from the first byte the app
sees to the response start; uvicorn's HTTP parsing and the network are outside it).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

from service import main as _main
from service.metrics import Metrics
from service.routers import v1, v2

_stages: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "lma_latency_stages", default=None
)
_last_batch: dict[str, Any] = {}


def _timed(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper_async(*args: Any, **kwargs: Any) -> Any:
            d = _stages.get()
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                if d is not None:
                    d[stage] = d.get(stage, 0.0) + time.perf_counter() - t

        return wrapper_async

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        d = _stages.get()
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if d is not None:
                d[stage] = d.get(stage, 0.0) + time.perf_counter() - t

    return wrapper


def _patch() -> None:
    stages = {
        v1: {
            "body_of": "body",
            "parse_json": "parse",
            "decode_v1": "parse",
            "rows_to_arrays": "encode",
            "score": "score",
            "json_response": "response",
        },
        v2: {
            "body_of": "body",
            "split_binary": "parse",
            "decode_v2": "parse",
            "v2_to_arrays": "encode",
            "score": "score",
        },
    }
    for mod, names in stages.items():
        for name, stage in names.items():
            if not hasattr(mod, name):
                raise RuntimeError(f"{mod.__name__} has no {name}: update scripts/latency_app.py")
            setattr(mod, name, _timed(getattr(mod, name), stage))
    observe = Metrics.observe_batch

    def observe_batch(self: Metrics, model: str, stats: Any) -> None:
        _last_batch["stats"] = stats
        observe(self, model, stats)

    Metrics.observe_batch = observe_batch  # type: ignore[method-assign]


_patch()
_inner = _main.app


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await _inner(scope, receive, send)
        return
    d: dict[str, float] = {}
    token = _stages.set(d)
    _last_batch.clear()
    t0 = time.perf_counter()

    async def timed_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            total = time.perf_counter() - t0
            parts = dict(d)
            stats = _last_batch.get("stats")
            if stats is not None and "score" in parts:
                parts["queue"] = float(stats.queue_wait_s[0]) if stats.queue_wait_s else 0.0
                parts["compute"] = float(stats.compute_s)
            if scope.get("path", "").endswith("/infer") and "score" in parts:
                done = sum(parts.get(k, 0.0) for k in ("body", "parse", "encode", "score"))
                parts["response"] = max(total - done, 0.0)
            parts["total"] = total
            value = ", ".join(f"{k};dur={v * 1e3:.4f}" for k, v in parts.items())
            message = {
                **message,
                "headers": [*message.get("headers", []), (b"server-timing", value.encode())],
            }
        await send(message)

    try:
        await _inner(scope, receive, timed_send)
    finally:
        _stages.reset(token)
