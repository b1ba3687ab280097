"""Prediction cache in Redis: a row's logit, keyed by the model version and the encoded row.

Off by default; ``LMA_SERVE_CACHE_TTL_S > 0`` (with ``REDIS_URL``) turns it on. Key layout,
version 1 (beside the feature store's ``lma:fs:v1:``)::

    lma:pc:v1:{model}:{version}:{bundle}:{row}    a string: the row's logit, float32 little-endian

``model`` and ``version`` are the served name and version, percent-encoded (RFC 3986, nothing
kept unescaped). ``bundle`` is the first 16 hex digits of the sha256 of the bundle's
``manifest.json``, which lists the sha256 of every file of the bundle: a version folder replaced by
another bundle under the same number gets fresh keys too. ``row`` is the hex blake2b-128 digest of
exactly what the model reads for the row: its dense values as float32 little-endian (``-0.0``
written as ``0.0``, every NaN as one NaN) followed by its token ids as int64 little-endian. The
row is hashed after decoding, so any JSON spelling that encodes to the same tensors (``5``,
``5.0`` or ``"5"`` for a categorical, field order, v1 rows or v2 tensors) finds the same entry.
Every entry is written with the TTL (``SET ... PX``); nothing else expires or deletes them.

Per batch (one request or request part): one ``MGET`` of all its rows' keys before scoring, the
misses alone go to the model, and their logits are written back in one pipeline of ``SET PX`` in
the background (the answer does not wait for it). Redis is never on the critical path for
longer than ``LMA_SERVE_CACHE_TIMEOUT_MS`` (and never past the request's deadline): a failed or
timed-out call is counted, the rows are scored by the model, and the cache is skipped for a
back-off (0.5 s doubling to 10 s) before Redis is tried again. A cache answer is never a reason
for a request to fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from service.backoff import Backoff

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
PREFIX = f"lma:pc:v{LAYOUT_VERSION}"

RunFn = Callable[[np.ndarray, np.ndarray], Awaitable[np.ndarray]]


def bundle_fingerprint(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of a bundle's manifest (which holds every file's sha256)."""
    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:16]


def key_prefix(model: str, version: str, fingerprint: str) -> str:
    return f"{PREFIX}:{quote(model, safe='')}:{quote(version, safe='')}:{fingerprint}"


def row_digests(dense: np.ndarray, tokens: np.ndarray) -> list[str]:
    """The ``row`` part of each row's key (see the module docstring)."""
    n = len(tokens)
    d = np.asarray(dense, dtype="<f4").reshape(n, -1) + np.float32(0.0)  # -0.0 -> 0.0
    nan = np.isnan(d)
    if nan.any():
        d = np.where(nan, np.float32("nan"), d)
    t = np.asarray(tokens, dtype="<i8").reshape(n, -1)
    rows = np.concatenate([np.ascontiguousarray(d).view(np.uint8).reshape(n, -1),
                           np.ascontiguousarray(t).view(np.uint8).reshape(n, -1)], axis=1)
    blake = hashlib.blake2b
    return [blake(r.tobytes(), digest_size=16).hexdigest() for r in rows]


class PredictionCache:
    """One per worker process: its own connection pool to ``url``."""

    def __init__(self, url: str, ttl_s: float, metrics: Any, *, timeout_s: float = 0.02,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 max_pending_writes: int = 64, max_connections: int = 64):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.ttl_ms = max(1, int(round(ttl_s * 1000)))
        self.timeout_s = float(timeout_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_pending_writes = max_pending_writes
        self.metrics = metrics
        # No retries inside redis-py: a failure is counted and backed off here, so a down server
        # costs a request at most one timeout.
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=self.timeout_s * 5, socket_connect_timeout=self.timeout_s * 5,
            max_connections=max_connections, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, decode_responses=False)
        self._backoff = Backoff(self.backoff_s, self.max_backoff_s)
        self.last_error: str | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._counts: dict[str, list[int]] = {}  # model -> [hits, rows looked up]

    @property
    def available(self) -> bool:
        return self._backoff.open

    def describe(self) -> dict[str, Any]:
        return {"layout": PREFIX, "ttl_seconds": self.ttl_ms / 1000,
                "available": self.available, "last_error": self.last_error}

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self.timeout_s * 10)
        await self._client.aclose()

    async def score(self, name: str, version: str, fingerprint: str, dense: np.ndarray,
                    tokens: np.ndarray, until: float, run: RunFn) -> np.ndarray:
        """Logits of the rows: cached ones from Redis, the others from ``run`` (the model)."""
        n = len(tokens)
        if n == 0:
            return await run(dense, tokens)
        prefix = key_prefix(name, version, fingerprint)
        keys = [f"{prefix}:{h}" for h in row_digests(dense, tokens)]
        got = await self._get(keys, until)
        if got is None:
            return await run(dense, tokens)
        out = np.empty(n, dtype=np.float32)
        miss: list[int] = []
        for i, v in enumerate(got):
            if v is not None and len(v) == 4:
                out[i] = np.frombuffer(v, dtype="<f4")[0]
            else:
                miss.append(i)
        self._count(name, n - len(miss), len(miss))
        if miss:
            if len(miss) == n:
                part = await run(dense, tokens)
            else:
                idx = np.asarray(miss)
                part = await run(np.ascontiguousarray(dense[idx]),
                                 np.ascontiguousarray(tokens[idx]))
            out[miss] = part
            self._put_later(name, [keys[i] for i in miss], part)
        return out

    def _count(self, name: str, hits: int, misses: int) -> None:
        m = self.metrics
        m.cache_hits.labels(name).inc(hits)
        m.cache_misses.labels(name).inc(misses)
        c = self._counts.setdefault(name, [0, 0])
        c[0] += hits
        c[1] += hits + misses
        m.cache_hit_ratio.labels(name).set(c[0] / c[1])

    async def _get(self, keys: list[str], until: float) -> list[bytes | None] | None:
        """The cached values, or None when the cache is skipped (down, or no time left)."""
        if not self.available:
            self.metrics.cache_errors.labels("get", "backoff").inc()
            return None
        left = until - time.monotonic()
        timeout = min(self.timeout_s, left)
        if timeout <= 0:
            self.metrics.cache_errors.labels("get", "deadline").inc()
            return None
        try:
            async with asyncio.timeout(timeout):
                got = await self._client.mget(keys)
        except TimeoutError as exc:
            # A wait cut short by the request's own deadline says nothing about Redis.
            if timeout >= self.timeout_s:
                self._failed("get", exc)
            else:
                self.metrics.cache_errors.labels("get", "deadline").inc()
            return None
        except Exception as exc:  # noqa: BLE001 - any client failure means: score without it
            self._failed("get", exc)
            return None
        self._ok()
        return got

    def _put_later(self, name: str, keys: list[str], logits: np.ndarray) -> None:
        if not self.available:
            return
        if len(self._pending) >= self.max_pending_writes:
            self.metrics.cache_errors.labels("set", "too_many_pending").inc()
            return
        values = np.asarray(logits, dtype="<f4")
        task = asyncio.create_task(self._put(name, keys, values))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, name: str, keys: list[str], values: np.ndarray) -> None:
        try:
            async with asyncio.timeout(self.timeout_s * 10):
                pipe = self._client.pipeline(transaction=False)
                for k, v in zip(keys, values, strict=True):
                    pipe.set(k, v.tobytes(), px=self.ttl_ms)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - a lost write only costs a later miss
            self._failed("set", exc)
            return
        self.metrics.cache_writes.labels(name).inc(len(keys))

    def _failed(self, op: str, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        reason = "timeout" if isinstance(exc, TimeoutError) else "error"
        self.metrics.cache_errors.labels(op, reason).inc()
        pause = self._backoff.failed()
        log.warning("prediction cache: %s failed (%s); skipped for %.1f s", op, self.last_error,
                    pause)

    def _ok(self) -> None:
        self._backoff.succeeded()
        self.last_error = None


def open_cache(settings: Any, metrics: Any) -> PredictionCache | None:
    """The cache the settings ask for, or None (``cache_ttl_s`` 0, the default)."""
    if settings.cache_ttl_s <= 0 or settings.redis_url is None:
        return None
    return PredictionCache(settings.redis_url.get_secret_value(), settings.cache_ttl_s, metrics,
                           timeout_s=settings.cache_timeout_ms / 1000.0)
