"""The models a server holds: name -> versions, each a bundle opened with a backend and its batcher.

Paths given to the server are bundle folders or model repositories, laid out as Triton and TF
Serving lay them out::

    repo/                      a repository: one folder per model
      ctr/                     a model: numbered version folders ...
        1/  manifest.json ...
        2/  manifest.json ...
      other/  manifest.json    ... or a bundle directly (its manifest names the version)

A path that is itself a model folder (numbered versions inside) or a bundle also works. The
newest version answers requests that name no version. Entries are replaced by swapping one
dict, so a hot reload (:mod:`service.reload`) can :meth:`ModelRegistry.add` a warmed version and
:meth:`ModelRegistry.remove` the old one while requests keep resolving; the old one is closed
only after its in-flight requests (:meth:`LoadedModel.hold`) are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lma.bundle import load_bundle
from lma.records import RecordEncoder
from lma.schema import Schema
from service.backends import Backend, open_backend
from service.batcher import BatchStats, MicroBatcher
from service.cache import bundle_fingerprint
from service.settings import ServeSettings

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelSource:
    name: str
    version: str
    path: Path


def discover(path: str | Path) -> list[ModelSource]:
    """The (name, version, folder) of every bundle under a path (see the module docstring)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model path {p} is not a folder")
    if (p / MANIFEST).is_file():
        return [_bundle_source(p, None)]
    versions = _versions(p)
    if versions:
        return [ModelSource(p.name, v.name, v) for v in versions]
    out: list[ModelSource] = []
    for sub in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")):
        if (sub / MANIFEST).is_file():
            out.append(_bundle_source(sub, sub.name))
        else:
            out += [ModelSource(sub.name, v.name, v) for v in _versions(sub)]
    if not out:
        raise FileNotFoundError(
            f"{p}: no bundle found (expected {MANIFEST} in it, numbered version folders, or one "
            "folder per model holding either)"
        )
    return out


def _versions(p: Path) -> list[Path]:
    vs = [q for q in p.iterdir() if q.is_dir() and q.name.isdigit() and (q / MANIFEST).is_file()]
    return sorted(vs, key=lambda q: int(q.name))


def _bundle_source(p: Path, name: str | None) -> ModelSource:
    import json

    try:
        m = json.loads((p / MANIFEST).read_text()).get("model", {})
    except ValueError:
        m = {}
    return ModelSource(name or str(m.get("name") or p.name), str(m.get("version") or "1"), p)


@dataclass
class LoadedModel:
    """One version of one model, ready to score."""

    name: str
    version: str
    path: Path
    bundle: Any
    schema: Schema
    backend: Backend
    batcher: MicroBatcher
    encoder: RecordEncoder
    load_s: float
    warmup_s: float = 0.0
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0
    # Names the bundle's content in the prediction cache's keys (service.cache).
    fingerprint: str = ""
    _idle: asyncio.Event | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def hold(self) -> Iterator[LoadedModel]:
        """Count a request as in flight on this version from the moment it resolved the model
        (before its body is read) until it answers, so an unload waits for it: otherwise a
        request that resolved the old version could find its batcher closed."""
        self.inflight += 1
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight == 0 and self._idle is not None:
                self._idle.set()

    async def drain(self) -> None:
        """Wait for the requests in flight (call it once the version is out of the registry, so
        no new one starts), answer what its batcher still holds, then release the backend."""
        while self.inflight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        await self.batcher.close()
        self.backend.close()

    @property
    def n_dense(self) -> int:
        return len(self.schema.dense)

    @property
    def n_slots(self) -> int:
        return self.schema.n_token_slots

    def describe(self) -> dict[str, Any]:
        m = self.bundle.manifest
        emb = m.get("embedding", {})
        metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
        p = self.backend.placement
        comp = self.bundle.component_bytes()
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "ready": self.ready,
            "kind": emb.get("kind"),
            "compression": metrics.get("compression"),
            "bytes": comp,
            "backend": self.backend.name,
            "engine": p.engine,
            "providers": p.providers,
            "device": p.device,
            "weights": p.weights,
            "native_ops": p.native_ops,
            "embedding_memory": {"location": p.memory, "bytes": comp["embedding"],
                                 **p.memory_bytes},
            "checksums": {k: v for k, v in (self.bundle.verification or {}).items()
                          if k in ("verified", "trusted", "skipped", "seconds")},
            "inputs": {"dense": self.n_dense, "tokens": self.n_slots},
            "fields": {"dense": self.schema.dense_names,
                       "categorical": self.schema.categorical_names},
            "load_seconds": round(self.load_s, 4),
            "warmup_seconds": round(self.warmup_s, 4),
            "test_auc": metrics.get("test_auc"),
        }


class ModelRegistry:
    def __init__(self, settings: ServeSettings, metrics: Any = None):
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self.sources: list[ModelSource] = []
        self.ready = False
        self.error: str | None = None

    # -------------------------------------------------------------- lookup

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_key)

    def get(self, name: str, version: str | None = None) -> LoadedModel | None:
        versions = self._models.get(name)
        if not versions:
            return None
        if version is None:
            return versions[max(versions, key=_version_key)]
        return versions.get(version)

    def all(self) -> list[LoadedModel]:
        return [m for vs in self._models.values() for m in vs.values()]

    # -------------------------------------------------------------- changes

    def add(self, model: LoadedModel) -> None:
        versions = dict(self._models.get(model.name, {}))
        versions[model.version] = model
        models = dict(self._models)
        models[model.name] = versions
        self._models = models

    def remove(self, name: str, version: str) -> LoadedModel | None:
        versions = dict(self._models.get(name, {}))
        gone = versions.pop(version, None)
        models = dict(self._models)
        if versions:
            models[name] = versions
        else:
            models.pop(name, None)
        self._models = models
        return gone

    # -------------------------------------------------------------- loading

    def open(self, src: ModelSource) -> LoadedModel:
        """Open one bundle (blocking: run it off the event loop)."""
        s = self.settings
        t0 = time.perf_counter()
        bundle = load_bundle(src.path, verify_checksums=s.verify_checksums)
        schema = bundle.schema
        backend = open_backend(s.backend, bundle, s.device, s.threads, s.weights)
        name, version = src.name, src.version
        metrics = self.metrics

        def on_batch(stats: BatchStats) -> None:
            if metrics is not None:
                metrics.observe_batch(name, stats)

        def on_depth(rows: int) -> None:
            if metrics is not None:
                metrics.queue_depth(name, rows)

        batcher = MicroBatcher(backend.run, max_batch_rows=s.max_batch_rows,
                               max_wait_ms=s.max_wait_ms, max_queue_rows=s.max_queue_rows,
                               on_batch=on_batch, on_queue_depth=on_depth, name=name)
        encoder = RecordEncoder(schema, max_value_bytes=s.max_string_bytes)
        return LoadedModel(name, version, src.path, bundle, schema, backend, batcher, encoder,
                           time.perf_counter() - t0, fingerprint=bundle_fingerprint(src.path))

    def discover_all(self) -> list[ModelSource]:
        """Find every configured bundle (fast; fails on a path with no bundle or a name twice)."""
        sources: list[ModelSource] = []
        for p in self.settings.model_paths():
            sources += discover(p)
        seen = set()
        for src in sources:
            if (src.name, src.version) in seen:
                raise ValueError(f"model {src.name!r} version {src.version} is given twice "
                                 f"({src.path})")
            seen.add((src.name, src.version))
        self.sources = sources
        return sources

    async def load_all(self, warmup: Any) -> None:
        """Open every discovered bundle and warm each with ``warmup(model)`` (a real batch through
        the whole request path); readiness turns true when all are done."""
        loop = asyncio.get_running_loop()
        try:
            for src in self.sources:
                model = await loop.run_in_executor(None, self.open, src)
                t0 = time.perf_counter()
                await warmup(model)
                model.warmup_s = time.perf_counter() - t0
                model.ready = True
                self.add(model)
                logger.info("model %s v%s ready (%s, %s; load %.2f s, warm-up %.3f s)",
                            model.name, model.version, model.backend.name,
                            model.backend.placement.device, model.load_s, model.warmup_s)
            self.ready = True
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the models failed; the server stays unready")

    async def close(self) -> None:
        """Finish queued requests of every model, then release them."""
        for m in self.all():
            await m.batcher.close()
            m.backend.close()


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


def sample_rows(model: LoadedModel, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = model.bundle.sample()
    d, t = s["dense"][:n], s["tokens"][:n]
    return np.ascontiguousarray(d, np.float32), np.ascontiguousarray(t, np.int64)
