"""Hot reload: load a model's new version next to the serving one, then retire the old one.

The admin routes (:mod:`service.routers.admin`) call :func:`reload_model` and
:func:`unload_model`. A reload rediscovers the model's numbered version folders in the configured
paths; the newest version newer than the one serving is opened off the event loop (its checksums
and bundle versions verified by :func:`lma.bundle.load_bundle`) and warmed with the same real
batch as at startup, and only then added to the registry, which swaps one dict: a request
resolves either the old or the new version, never a half-loaded one. If it is refused, the next
older new version is tried; the old one keeps serving either way. After a swap, every older
version leaves the registry at once and is closed once its in-flight requests are answered.

Besides the admin routes, two triggers run the same :func:`reload_model` (started by
:func:`start_triggers`, both off by default): :class:`FolderWatch` polls the model folders every
``LMA_SERVE_WATCH_INTERVAL_S`` seconds, and :class:`service.pubsub.ReloadListener` reloads on a
message on ``LMA_SERVE_RELOAD_CHANNEL``. ``lma_reload_triggers_total{trigger, outcome}`` counts
every reload asked for, by where it came from and what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
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
    versions = [m.version for m in gone]
    if gone:
        gone.clear()
        _release_memory()
    return versions, time.perf_counter() - t0


def _release_memory() -> None:
    """Give a closed version's memory back to the OS: collect reference cycles that may still
    hold its session, then ask glibc to return freed heap pages (it keeps them otherwise, and
    the process's RSS would not fall after an unload)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def reload_model(state: AppState, name: str, trigger: str = "admin"
                       ) -> tuple[int, dict[str, Any]]:
    """(HTTP status, answer) of reloading ``name``; counted by ``trigger``."""
    try:
        status, answer = await _reload(state, name)
    except RequestError:
        label = name if name in state.registry.names() else "unknown"
        state.metrics.reload_triggers.labels(label, trigger, "error").inc()
        raise
    outcome = ("refused" if status != 200 else "loaded" if answer.get("loaded") else "unchanged")
    state.metrics.reload_triggers.labels(name, trigger, outcome).inc()
    return status, answer


async def _reload(state: AppState, name: str) -> tuple[int, dict[str, Any]]:
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


async def trigger_reload(state: AppState, name: str, trigger: str) -> tuple[int, dict[str, Any]]:
    """:func:`reload_model` for the triggers that have no one to answer: refusals are logged."""
    try:
        status, answer = await reload_model(state, name, trigger)
    except RequestError as exc:
        logger.warning("%s reload of %s not done: %s", trigger, name, exc.message)
        return exc.status, exc.body()
    if answer.get("loaded"):
        logger.info("%s reload of %s: serving version %s", trigger, name, answer["serving"])
    elif status != 200:
        logger.warning("%s reload of %s refused: %s", trigger, name, answer.get("error"))
    return status, answer


def _folder_state(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes while a version folder is being written: its files' names, sizes, mtimes."""
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            out.append((str(f.relative_to(path)), st.st_size, st.st_mtime_ns))
    return tuple(out)


class FolderWatch:
    """Polls the configured model paths every ``interval_s`` and reloads a served model when a
    version folder newer than its serving version appears.

    A new version is tried once its folder looks the same (file names, sizes, mtimes) in two
    consecutive polls, so a folder still being copied is not opened half-written (publishing
    by one rename, as the README shows, is still the safe way). A refused version is not tried
    again until its folder changes. Models unloaded through the admin route are left alone:
    only models the registry serves are watched.
    """

    def __init__(self, state: AppState, interval_s: float):
        self.state = state
        self.interval_s = interval_s
        self._seen: dict[str, Any] = {}  # model -> folder state of its newer versions, last poll
        self._refused: dict[str, Any] = {}  # model -> folder state that was refused
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="folder-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("model folder watch: poll failed; trying again")

    def _newer(self) -> dict[str, Any]:
        """model -> folder state of its version folders newer than the serving one (blocking)."""
        reg = self.state.registry
        out: dict[str, Any] = {}
        for name in reg.names():
            serving = reg.get(name)
            if serving is None:
                continue
            try:
                found = _discover(self.state.settings, name)
            except (OSError, ValueError) as exc:
                logger.warning("model folder watch: %s", exc)
                continue
            newer = [s for s in found if _version_key(s.version) > _version_key(serving.version)]
            if newer:
                out[name] = tuple((s.version, _folder_state(s.path)) for s in newer)
        return out

    async def poll(self) -> None:
        if not self.state.registry.ready:
            return
        loop = asyncio.get_running_loop()
        newer = await loop.run_in_executor(None, self._newer)
        seen, self._seen = self._seen, newer
        for name, folders in newer.items():
            if seen.get(name) != folders or self._refused.get(name) == folders:
                continue
            status, _ = await trigger_reload(self.state, name, "watch")
            if status == 409:
                self._refused[name] = folders
            else:
                self._refused.pop(name, None)


class Triggers:
    """The reload triggers a server runs besides its admin routes."""

    def __init__(self, watch: FolderWatch | None, listener: Any):
        self.watch = watch
        self.listener = listener

    async def stop(self) -> None:
        if self.watch is not None:
            await self.watch.stop()
        if self.listener is not None:
            await self.listener.stop()


def start_triggers(state: AppState) -> Triggers:
    """Start the folder watch and the reload-channel listener the settings ask for."""
    s = state.settings
    watch = None
    if s.watch_interval_s > 0:
        watch = FolderWatch(state, s.watch_interval_s)
        watch.start()
        logger.info("watching the model folders for new versions every %.1f s",
                    s.watch_interval_s)
    listener = None
    if s.reload_channel and s.redis_url is not None:
        from service.pubsub import ReloadListener

        async def on_reload(model: str, catch_up: bool) -> None:
            reg = state.registry
            if not reg.ready and reg.error is None:
                # The startup load may have discovered the folders before this version arrived:
                # reload once it is done rather than drop the message.
                while not reg.ready and reg.error is None:
                    await asyncio.sleep(0.2)
            if not catch_up:
                await trigger_reload(state, model, "pubsub")
            elif reg.ready:
                # Messages sent while the listener was away are lost: check every model once.
                for name in reg.names():
                    await trigger_reload(state, name, "pubsub")

        listener = ReloadListener(s.redis_url.get_secret_value(), s.reload_channel, on_reload,
                                  state.metrics)
        listener.start()
    return Triggers(watch, listener)


async def broadcast(state: AppState, name: str) -> dict[str, Any]:
    """Publish a reload of ``name`` on the reload channel; what the answer says about it."""
    from service.pubsub import publish_async

    s = state.settings
    if not s.reload_channel or s.redis_url is None:
        raise RequestError(409, "broadcast needs LMA_SERVE_RELOAD_CHANNEL and REDIS_URL on the "
                           "server", field="broadcast", kind="broadcast_off")
    try:
        n = await publish_async(s.redis_url.get_secret_value(), s.reload_channel, name)
    except Exception as exc:  # noqa: BLE001 - reported in the answer; the local reload still runs
        logger.warning("broadcast of %s on %r failed: %s", name, s.reload_channel, exc)
        return {"channel": s.reload_channel, "receivers": 0,
                "error": f"{type(exc).__name__}: {exc}"}
    # The count includes this process's own listener, which skips its own message.
    return {"channel": s.reload_channel, "receivers": n}
