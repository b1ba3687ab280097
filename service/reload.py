"""Hot reload: load a model's new version next to the serving one, then retire the old one.

The admin routes (:mod:`service.routers.admin`) call :func:`reload_model` and
:func:`unload_model`. A reload rediscovers the model's numbered version folders in the configured
paths; the newest version newer than the one serving is opened off the event loop (its checksums
and bundle versions verified by :func:`lma.bundle.load_bundle`) and warmed with the same real
batch as at startup, and only then added to the registry, which swaps one dict: a request
resolves either the old or the new version, never a half-loaded one. If it is refused, the next
older new version is tried; the old one keeps serving either way. After a swap, every older
version leaves the registry at once and is closed once its in-flight requests are answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from service.errors import RequestError
from service.registry import LoadedModel, ModelSource, _version_key, discover
from service.settings import ServeSettings
from service.state import AppState
from service.warmup import warm_up

logger = logging.getLogger(__name__)


def _discover(settings: ServeSettings, name: str) -> list[ModelSource]:
    found: dict[str, ModelSource] = {}
    for p in settings.model_paths():
        for src in discover(p):
            if src.name == name:
                found.setdefault(src.version, src)
    return sorted(found.values(), key=lambda s: _version_key(s.version))


def _lock(state: AppState, name: str) -> asyncio.Lock:
    return state.model_locks.setdefault(name, asyncio.Lock())


def _check_ready(state: AppState) -> None:
    if not state.registry.ready:
        raise RequestError(503, "the startup load has not finished (see /v2/health/ready); "
                           "retry once the server is ready", kind="not_ready",
                           headers={"Retry-After": "1"})


async def _retire(state: AppState, name: str, versions: list[str]) -> tuple[list[str], float]:
    """Take versions out of the registry now, close them after their last request."""
    gone: list[LoadedModel] = []
    for v in versions:
        m = state.registry.remove(name, v)
        if m is not None:
            gone.append(m)
    t0 = time.perf_counter()
    for m in gone:
        await m.drain()
        state.metrics.unloads.labels(name).inc()
        logger.info("model %s v%s unloaded", name, m.version)
    return [m.version for m in gone], time.perf_counter() - t0


async def reload_model(state: AppState, name: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, answer) of reloading ``name``."""
    _check_ready(state)
    reg, metrics = state.registry, state.metrics
    loop = asyncio.get_running_loop()
    async with _lock(state, name):
        try:
            found = await loop.run_in_executor(None, _discover, state.settings, name)
        except (OSError, ValueError) as exc:
            raise RequestError(409, f"rediscovering model {name!r} failed: {exc}",
                               kind="reload_refused") from None
        if not found and name not in reg.names():
            raise RequestError(404, f"no model {name!r} under the configured paths "
                               f"{state.settings.model_paths()}", field="model",
                               kind="unknown_model")
        serving = reg.get(name)
        newer = [s for s in found if serving is None
                 or _version_key(s.version) > _version_key(serving.version)]
        refused: list[dict[str, Any]] = []
        loaded: LoadedModel | None = None
        for src in reversed(newer):
            stage = "open"
            model: LoadedModel | None = None
            try:
                model = await loop.run_in_executor(None, reg.open, src)
                stage = "warmup"
                t0 = time.perf_counter()
                await warm_up(state, model)
                model.warmup_s = time.perf_counter() - t0
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                refused.append({"version": src.version, "path": str(src.path), "stage": stage,
                                "error": reason})
                metrics.reload_failures.labels(name, stage).inc()
                logger.warning("model %s v%s refused at %s: %s", name, src.version, stage, reason)
                if model is not None:
                    await model.drain()
                continue
            model.ready = True
            reg.add(model)
            metrics.reloads.labels(name).inc()
            loaded = model
            logger.info("model %s v%s swapped in (load %.2f s, warm-up %.3f s)", name,
                        model.version, model.load_s, model.warmup_s)
            break
        now = reg.get(name)
        answer: dict[str, Any] = {"model": name, "serving": now.version if now else None,
                                  "loaded": None, "unloaded": [], "refused": refused}
        if loaded is None:
            if refused:
                metrics.errors.labels("reload_refused", "409").inc()
                first = refused[0]
                answer["error"] = (f"model {name!r} version {first['version']} refused "
                                   f"({first['stage']}): {first['error']}; still serving "
                                   f"version {answer['serving']}")
                return 409, answer
            answer["message"] = (f"no version newer than {answer['serving']} in "
                                 f"{sorted({str(s.path.parent) for s in found})}")
            return 200, answer
        answer["loaded"] = {"version": loaded.version, "path": str(loaded.path),
                            "load_seconds": round(loaded.load_s, 4),
                            "warmup_seconds": round(loaded.warmup_s, 4)}
        old = [v for v in reg.versions(name) if v != loaded.version]
        answer["unloaded"], drain_s = await _retire(state, name, old)
        answer["drain_seconds"] = round(drain_s, 4)
        return 200, answer


async def unload_model(state: AppState, name: str) -> dict[str, Any]:
    """Unload every version of ``name`` (each after its in-flight requests)."""
    _check_ready(state)
    async with _lock(state, name):
        versions = state.registry.versions(name)
        if not versions:
            raise RequestError(404, f"model {name!r} is not loaded (models: "
                               f"{state.registry.names()})", field="model", kind="unknown_model")
        unloaded, drain_s = await _retire(state, name, versions)
    return {"model": name, "unloaded": unloaded, "drain_seconds": round(drain_s, 4)}
