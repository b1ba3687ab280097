"""Online feature store in Redis: per-entity latest feature values, loaded offline, read per batch.

Key layout, version 1 (in the spirit of Feast's Redis online store: project, entity, id)::

    lma:fs:v1:{project}:{entity fields}:{entity values}    a hash: field name -> value text
    lma:fs:v1:{project}:{entity fields}:__meta__           a hash describing the last load

``entity fields`` are the entity's field names sorted and joined by ``,`` (``device_id``, or
``device_id,site_id`` for a compound entity); ``entity values`` the values in the same order,
each percent-encoded (RFC 3986, nothing kept unescaped, so ``:`` and ``,`` never appear raw) and
joined by ``,``. Values are the canonical text of :func:`lma.records.canonical_text`, so the JSON
number ``15706`` and the string ``"15706"`` name the same entity, as the training text did.

A hash holds the entity's latest row (latest by the schema's time column when it has one, ties and
schemas without one going to the later row in the file): one field per stored feature, whose
value is the text the data file held (so the service encodes it exactly as training did; empty
cells are not stored), plus ``__ts`` (the row's time value) where the schema has a time column.
Fields whose names start with ``__`` are the store's own and never reach a request. A reload
replaces each entity's hash whole (no stale fields); ``--ttl`` sets an expiry per key.

:func:`load_features` writes (sync client, pipelined per chunk); :class:`FeatureStore` reads
(asyncio client with hiredis, one round trip per batch: one server-side script returns every
entity's hash, a timeout on every call, and a back-off after a failure so a down server costs
requests no time until it is retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from lma.records import canonical_text
from lma.schema import Schema
from service.backoff import Backoff

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
PREFIX = f"lma:fs:v{LAYOUT_VERSION}"
META = "__meta__"
TS_FIELD = "__ts"
# The service's back-off after a failed call: 0.25 s doubling to 2 s, so while Redis is down a
# worker asks it again at most every 2 s and is back within 2 s of its return.
BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0
PROBE_TIMEOUT_S = 0.25


_HGETALL_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', key)
end
return out
"""


class FeatureStoreError(RuntimeError):
    """The store could not answer (connection refused or lost, timeout, back-off after those);
    ``kind`` says which (connection, timeout, backoff, redis, deadline), for metrics."""

    kind = "connection"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class FeatureStoreDeadline(FeatureStoreError):
    """The request's own deadline ran out before the store answered. Not the store's fault: no
    back-off follows (one client's short deadline must not take the store away from the rest)."""

    kind = "deadline"


def entity_prefix(project: str, entity_fields: Sequence[str]) -> str:
    """``lma:fs:v1:{project}:{sorted entity fields}``."""
    if not project or ":" in project:
        raise ValueError(f"project name must be non-empty without ':', got {project!r}")
    names = sorted(entity_fields)
    if not names:
        raise ValueError("at least one entity field is needed")
    return f"{PREFIX}:{project}:{','.join(names)}"


def entity_key(project: str, entity: Mapping[str, Any]) -> str:
    """The Redis key of one entity, e.g. ``{"device_id": "a99f214a"}`` ->
    ``lma:fs:v1:avazu:device_id:a99f214a``. Raises ValueError for a missing or bad value."""
    names = sorted(entity)
    parts = []
    for name in names:
        text = canonical_text(entity[name])
        if text is None or text == "":
            raise ValueError(f"entity field '{name}' has no value")
        parts.append(quote(text, safe=""))
    return f"{entity_prefix(project, names)}:{','.join(parts)}"


# -- loading --------------------------------------------------------------------------------


@dataclass
class LoadSummary:
    project: str
    entity: list[str]
    fields: list[str]
    rows: int = 0
    rows_without_entity: int = 0
    keys_written: int = 0
    writes: int = 0  # hash writes (a key rewritten by a later chunk counts again)
    seconds: float = 0.0
    ttl_s: int | None = None
    bad_rows: int = 0
    prefix: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def default_fields(schema: Schema, entity: Sequence[str]) -> list[str]:
    """Every raw feature column the schema reads (derivation sources included), but the label
    and the entity fields."""
    from lma.data.readers import source_columns

    skip = {schema.label, *entity}
    return [c for c in source_columns(schema) if c not in skip]


def _latest_per_key(keys: np.ndarray, times: np.ndarray | None) -> np.ndarray:
    """Row index of each key's latest row in a chunk (max time, ties to the later row)."""
    n = len(keys)
    # Sort by (key, time, position); the last row of each key's run is its latest.
    pos = np.arange(n)
    order = np.lexsort((pos, keys) if times is None else (pos, times, keys))
    k = keys[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return order[last]


def load_features(
    source: Any,
    entity: Sequence[str],
    redis_url: str,
    *,
    fields: Sequence[str] | None = None,
    project: str | None = None,
    ttl_s: int | None = None,
    progress: bool = False,
    client: Any = None,
) -> LoadSummary:
    """Write each entity's latest feature values from a :class:`lma.data.DataSource` into Redis.

    Rows whose entity fields are empty are skipped (counted). Rows the reader rejects follow its
    ``on_error``. Returns a summary of what was written.
    """
    import redis

    schema: Schema = source.schema
    entity = list(entity)
    project = project or schema.name
    prefix = entity_prefix(project, entity)
    fields = list(fields) if fields is not None else default_fields(schema, entity)
    names = sorted(entity)
    summary = LoadSummary(project, names, fields, ttl_s=ttl_s, prefix=prefix)
    r = client or redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=10)
    tcol = schema.time_column
    written: dict[str, Any] = {}  # key -> time of the row stored (only with a time column)
    t0 = time.perf_counter()
    bar = tqdm(desc="features", unit="rows", disable=not progress)
    try:
        for table, _ in source.iter_tables():
            missing = [c for c in [*entity, *fields] if c not in table.column_names]
            if missing:
                raise ValueError(
                    f"{source.name}: no column(s) {missing} (it has {table.column_names})"
                )
            n = table.num_rows
            summary.rows += n
            ent = [_text(table.column(c)) for c in names]
            ok = np.ones(n, dtype=bool)
            for col in ent:
                ok &= np.asarray(pc.fill_null(pc.greater(pc.utf8_length(col), 0), False))
            summary.rows_without_entity += int(n - ok.sum())
            quoted = [[quote(v, safe="") if v else "" for v in col.to_pylist()] for col in ent]
            keys = np.array(
                [f"{prefix}:{','.join(p)}" for p in zip(*quoted, strict=True)], dtype=object
            )
            times = None
            if tcol and tcol in table.column_names:
                times = _sortable_times(table.column(tcol))
            idx = np.flatnonzero(ok)
            if len(idx) == 0:
                bar.update(n)
                continue
            pick = idx[
                _latest_per_key(keys[idx].astype(str), None if times is None else times[idx])
            ]
            values = {c: _text(table.column(c)).to_pylist() for c in fields}
            tvals = _text(table.column(tcol)).to_pylist() if times is not None else None
            pipe = r.pipeline(transaction=False)
            for i in pick.tolist():
                key = keys[i]
                if times is not None:
                    prev = written.get(key)
                    if prev is not None and times[i] < prev:
                        continue
                    written[key] = times[i]
                else:
                    written[key] = None
                mapping = {c: values[c][i] for c in fields if values[c][i]}
                if tvals is not None:
                    mapping[TS_FIELD] = tvals[i]
                pipe.delete(key)
                if mapping:
                    pipe.hset(key, mapping=mapping)
                if ttl_s:
                    pipe.expire(key, int(ttl_s))
                summary.writes += 1
            pipe.execute()
            bar.update(n)
        summary.keys_written = len(written)
        summary.bad_rows = getattr(getattr(source, "errors", None), "count", 0)
        summary.seconds = time.perf_counter() - t0
        meta = {
            "layout": str(LAYOUT_VERSION),
            "schema": schema.name,
            "entity": ",".join(names),
            "fields": json.dumps(fields),
            "rows": str(summary.rows),
            "keys": str(summary.keys_written),
            "source": str(getattr(source, "name", "")),
            "loaded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        r.delete(f"{prefix}:{META}")
        r.hset(f"{prefix}:{META}", mapping=meta)
    finally:
        bar.close()
    return summary


def _text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr


def _sortable_times(col: pa.ChunkedArray) -> np.ndarray:
    """The time column as numbers to compare (missing or unparseable values sort first)."""
    arr = _text(col)
    try:
        num = pc.cast(
            pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr), pa.float64()
        )
        return np.asarray(num.fill_null(-np.inf).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = np.full(len(arr), -np.inf)
        for i, v in enumerate(arr.to_pylist()):
            with contextlib.suppress(TypeError, ValueError):
                out[i] = float(v)
        return out


def get_features(
    redis_url: str, project: str, entity: Mapping[str, Any], client: Any = None
) -> dict[str, str] | None:
    """One entity's stored hash (the store's own ``__`` fields included), or None."""
    import redis

    r = client or redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=10)
    got = r.hgetall(entity_key(project, entity))
    if not got:
        return None
    return {k.decode(): v.decode() for k, v in got.items()}


# -- reading in the service -----------------------------------------------------------------


@dataclass
class StoreStats:
    """Counts of one store's calls (the service also exports them as metrics)."""

    calls: int = 0
    keys: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    last_seconds: float = 0.0
    total_seconds: float = 0.0


# (seconds, hits, misses, error kind or None) of one fetch: the service's metrics hook.
FetchObserver = Callable[[float, int, int, "str | None"], None]


class FeatureStore:
    """Async reader of the layout above: ``await store.fetch(entities)`` in one round trip (one
    script call for all keys of the batch).

    ``timeout_s`` bounds every call (connect, send, read; a call given ``until``, a request's
    deadline on ``time.monotonic()``, waits at most until then). After a failure the store
    answers :class:`FeatureStoreError` at once for ``backoff_s`` (doubling up to
    ``max_backoff_s`` while failures continue), then tries the server again: a down Redis never
    holds a request past its deadline, and the store is back by itself when Redis is. One
    connection pool per instance (per worker process); ``project`` is the key namespace unless a
    call names its own.
    """

    def __init__(
        self,
        url: str,
        project: str | None = None,
        *,
        timeout_s: float = 0.05,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        max_connections: int = 64,
        observer: FetchObserver | None = None,
    ):
        import redis.asyncio as aioredis

        self.url = url
        self.project = project
        self.timeout_s = float(timeout_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.observer = observer
        # A blocking pool: past max_connections concurrent calls a call waits for a connection
        # (within its timeout) instead of failing, which would put the store into back-off.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=self.timeout_s,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry_on_timeout=False,
            decode_responses=True,  # hiredis decodes the replies in C
        )
        self._client = aioredis.Redis(connection_pool=pool)
        # All hashes of a batch in one command and one reply: 2-3x cheaper for the client than a
        # pipeline of one HGETALL per key (redis-py builds and parses each command in Python).
        # The keys of one call must live on one server (no Redis Cluster across slots).
        self._hgetall_many = self._client.register_script(_HGETALL_MANY)
        self._backoff = Backoff(self.backoff_s, self.max_backoff_s)
        self.reachable: bool | None = None  # None until the first call
        self.last_error: str | None = None  # kept after recovery, with its time
        self.last_error_at: float | None = None  # time.time()
        self.last_ok_at: float | None = None
        self.stats = StoreStats()

    @property
    def available(self) -> bool:
        """False while backing off after a failure."""
        return self._backoff.open

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self, timeout_s: float | None = None) -> bool:
        try:
            await self._call(self._client.ping(), timeout_s, None)
            return True
        except FeatureStoreError:
            return False

    async def fetch(
        self,
        entities: Sequence[Mapping[str, Any] | None],
        timeout_s: float | None = None,
        *,
        until: float | None = None,
        project: str | None = None,
    ) -> list[dict[str, str] | None]:
        """Stored fields of each entity (None: no entity given, or none stored), in order.

        Equal entities are fetched once; all in one round trip, waiting at most ``timeout_s``
        (default: the store's) and never past ``until``. Raises ValueError for an entity with
        an empty value, :class:`FeatureStoreDeadline` when ``until`` ran out first,
        :class:`FeatureStoreError` when the store cannot answer.
        """
        ns = project or self.project
        if ns is None:
            raise ValueError("no project: the store has none and the call names none")
        keys: list[str | None] = [
            None if e is None or not e else entity_key(ns, e) for e in entities
        ]
        unique = list(dict.fromkeys(k for k in keys if k is not None))
        self.stats.calls += 1
        if not unique:
            return [None] * len(keys)
        t0 = time.perf_counter()
        try:
            raw = await self._call(self._hgetall_many(keys=unique), timeout_s, until)
        except FeatureStoreError as e:
            self._observe(time.perf_counter() - t0, 0, 0, e.kind)
            raise
        finally:
            dt = time.perf_counter() - t0
            self.stats.last_seconds = dt
            self.stats.total_seconds += dt
        found: dict[str, dict[str, str] | None] = {}
        for k, h in zip(unique, raw, strict=True):
            if h:
                pairs = zip(h[::2], h[1::2], strict=True)
                found[k] = {f: v for f, v in pairs if not f.startswith("__")}
            else:
                found[k] = None
        self.stats.keys += len(unique)
        hits = sum(1 for v in found.values() if v is not None)
        self.stats.hits += hits
        self.stats.misses += len(unique) - hits
        self._observe(dt, hits, len(unique) - hits, None)
        return [None if k is None else found[k] for k in keys]

    def _observe(self, seconds: float, hits: int, misses: int, error: str | None) -> None:
        if self.observer is not None:
            self.observer(seconds, hits, misses, error)

    async def _call(self, aw: Any, timeout_s: float | None, until: float | None) -> Any:
        if not self.available:
            _close(aw)
            self.stats.errors += 1
            raise FeatureStoreError(
                f"feature store {self._safe_url()} unavailable (retrying in "
                f"{self._backoff.remaining_s():.1f} s): {self.last_error}",
                kind="backoff",
            )
        budget = self.timeout_s if timeout_s is None else float(timeout_s)
        bound_by_request = False
        if until is not None and until - time.monotonic() < budget:
            budget = until - time.monotonic()
            bound_by_request = True
        if budget <= 0:
            _close(aw)
            self.stats.errors += 1
            raise FeatureStoreDeadline(
                "the request's deadline passed before the feature store was asked"
            )
        try:
            async with asyncio.timeout(budget):
                out = await aw
        except (TimeoutError, OSError, ConnectionError, _redis_errors()) as e:
            self.stats.errors += 1
            timed_out = isinstance(e, TimeoutError | _redis_timeout())
            if timed_out and bound_by_request:
                raise FeatureStoreDeadline(
                    f"feature store {self._safe_url()}: no answer within the "
                    f"{budget * 1e3:.0f} ms left of the request's deadline"
                ) from e
            self._failed(e)
            kind = "timeout" if timed_out else (
                "connection" if isinstance(e, OSError | ConnectionError | _redis_conn()) else "redis"
            )
            raise FeatureStoreError(
                f"feature store {self._safe_url()}: {self.last_error}", kind=kind
            ) from e
        self._backoff.succeeded()
        self.reachable = True
        self.last_ok_at = time.time()
        return out

    def _failed(self, e: BaseException) -> None:
        self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self.last_error_at = time.time()
        self.reachable = False
        self._backoff.failed()
        log.warning("feature store %s: %s", self._safe_url(), self.last_error)

    def status(self) -> dict[str, Any]:
        """What readiness details show: reachable (None before the first call), the last error
        and when, back-off left, counts."""
        wait = self._backoff.remaining_s()
        return {
            "url": self._safe_url(),
            "reachable": self.reachable,
            "last_ok_at": _iso(self.last_ok_at),
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "retry_in_s": round(wait, 3) if wait > 0 else 0.0,
            "timeout_ms": self.timeout_s * 1e3,
            "calls": self.stats.calls,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "errors": self.stats.errors,
        }

    def _safe_url(self) -> str:
        """The URL without its password."""
        from urllib.parse import urlsplit, urlunsplit

        u = urlsplit(self.url)
        if u.password:
            netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
            return urlunsplit(u._replace(netloc=netloc))
        return self.url


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


def _redis_errors() -> type[BaseException]:
    import redis.exceptions

    return redis.exceptions.RedisError


def _redis_timeout() -> type[BaseException]:
    import redis.exceptions

    return redis.exceptions.TimeoutError


def _redis_conn() -> type[BaseException]:
    import redis.exceptions

    return redis.exceptions.ConnectionError


def _close(aw: Any) -> None:
    """Drop an awaitable that will not be awaited (a coroutine would warn)."""
    close = getattr(aw, "close", None)
    if close is not None:
        close()


def merge_stored(
    rows: list[dict[str, Any]], stored: Iterable[dict[str, str] | None]
) -> list[dict[str, Any]]:
    """Each row with its entity's stored fields underneath (the row's own values win)."""
    return [row if s is None else {**s, **row} for row, s in zip(rows, stored, strict=True)]


class RedisFeatureSource:
    """The service's feature-source hook (:class:`service.decoding.FeatureSource`) on a store.

    A request may name one entity for all its rows (``entities``) and one per row
    (``row_entities``); all are fetched in one round trip. Each row is then filled, field by
    field where it has no value, in this order (the first one with a value wins): the row's own
    values (the request's, context included), its own entity's fields, the request entity's
    fields (entity fields are values the caller sent, when they are model features), the stored
    fields of its own entity, then those of the request's entity.

    When the store cannot answer, the rows keep only their own values (and the entity fields)
    and the answer carries a warning, or, with ``required=True``, the request fails with 503.
    When the request's deadline runs out first, 504. Entities without stored features are warned
    about, not refused (their rows take the missing values, as unseen values do). Keys live under
    ``project``, or each model's schema name (``lma features load``'s default) without one.
    """

    def __init__(
        self, store: FeatureStore, *, required: bool = False, project: str | None = None
    ):
        self.store = store
        self.required = required
        self.project = project

    async def fill(
        self,
        schema: Schema,
        rows: list[dict[str, Any]],
        entities: dict[str, Any] | None,
        row_entities: list[dict[str, Any] | None] | None,
        *,
        until: float | None = None,
    ) -> list[str]:
        from lma.records import encoder_for
        from service.errors import RequestError

        own = row_entities if row_entities is not None else [None] * len(rows)
        known = encoder_for(schema).known
        try:
            stored = await self.store.fetch(
                [entities, *own], until=until, project=self.project or schema.name
            )
        except ValueError as e:
            raise RequestError(422, f"entities: {e}", field="entities", kind="bad_entity") from None
        except FeatureStoreDeadline as e:
            raise RequestError(504, str(e), kind="deadline") from None
        except FeatureStoreError as e:
            if self.required:
                raise RequestError(
                    503,
                    f"{e} (LMA_SERVE_FEATURES_REQUIRED is set)",
                    kind="feature_store",
                    headers={"Retry-After": "1"},
                ) from None
            for row, ent in zip(rows, own, strict=True):
                _fill(row, (ent, entities), known)
            return [f"feature store unavailable, stored features left out: {e}"]
        req_stored, row_stored = stored[0], stored[1:]
        misses = []
        for i, (row, ent, got) in enumerate(zip(rows, own, row_stored, strict=True)):
            _fill(row, (ent, entities, got, req_stored), known)
            if ent and got is None:
                misses.append(i)
        warnings = []
        if entities and req_stored is None:
            warnings.append(f"no stored features for the request's entities {entities}")
        if misses:
            warnings.append(
                f"no stored features for the entities of {len(misses)} row(s) "
                f"(first: row {misses[0]}, {own[misses[0]]})"
            )
        return warnings

    async def status(self, probe: bool = False) -> dict[str, Any]:
        """Readiness details; ``probe`` pings the server first, waiting at most the store's
        timeout or ``PROBE_TIMEOUT_S`` (a readiness probe has its own timeout, often 1 s)."""
        if probe:
            await self.store.ping(min(self.store.timeout_s, PROBE_TIMEOUT_S))
        return {
            "configured": True,
            "project": self.project or "each model's schema name",
            "required": self.required,
            **self.store.status(),
        }

    async def close(self) -> None:
        await self.store.close()


def _fill(row: dict[str, Any], layers: Iterable[Mapping[str, Any] | None], known: Any) -> None:
    """Set the row's missing model fields from the first layer that has them."""
    for layer in layers:
        if not layer:
            continue
        for k, v in layer.items():
            if k in known and row.get(k) is None:
                row[k] = v


def no_store_status() -> dict[str, Any]:
    """Readiness details of a server without ``REDIS_URL``."""
    return {
        "configured": False,
        "mode": "inline features only: REDIS_URL is not set, requests naming entities get 422",
    }


def open_feature_source(settings: Any, metrics: Any = None) -> RedisFeatureSource | None:
    """The service's feature source from its settings (None without ``REDIS_URL``): one
    :class:`FeatureStore`, hence one connection pool, per worker process. Opening connects to
    nothing; the first request or readiness probe does."""
    if settings.redis_url is None:
        return None
    store = FeatureStore(
        settings.redis_url.get_secret_value(),
        settings.feature_project,
        timeout_s=settings.feature_timeout_ms / 1e3,
        backoff_s=BACKOFF_S,
        max_backoff_s=MAX_BACKOFF_S,
        observer=None if metrics is None else metrics.observe_feature_fetch,
    )
    if metrics is not None:
        metrics.feature_store_up.set_function(lambda: 1.0 if store.reachable else 0.0)
    return RedisFeatureSource(
        store, required=settings.features_required, project=settings.feature_project
    )

