"""Reload messages over Redis pub/sub: every replica subscribed to one channel reloads together.

With ``LMA_SERVE_RELOAD_CHANNEL`` set (``lma:reload:v1`` is the suggested name) and ``REDIS_URL``,
every worker process of every replica subscribes to the channel. A message names a model; each
subscriber then runs the same verified reload as the admin route (:func:`service.reload.
reload_model`): newest version folder, checksums and versions, warm-up, atomic swap, drain.

Message format, version 1: a JSON object ``{"v": 1, "model": NAME, "origin": ID}`` (``origin``
optional: the process that published it, which skips its own message because its admin route
reloads it directly), or the bare model name, so ``redis-cli PUBLISH lma:reload:v1 ctr`` works.
Pub/sub delivers to the subscribers connected at the time, so the listener reconnects by itself
(back-off 0.5 s doubling to 10 s, health-check pings every 5 s) and, after a reconnect, checks every
model for a newer version once: a message sent while it was away is not lost for good.

Publishers: the admin reload route with ``?broadcast=true``, ``lma models publish`` (copies a
bundle in as the next version folder, then publishes), or any Redis client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from service.backoff import Backoff

log = logging.getLogger(__name__)

MESSAGE_VERSION = 1
# Unique per process: a message this process published carries it.
ORIGIN = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def message(model: str, origin: str | None = ORIGIN) -> str:
    body: dict[str, Any] = {"v": MESSAGE_VERSION, "model": model}
    if origin:
        body["origin"] = origin
    return json.dumps(body, separators=(",", ":"))


def parse_message(data: bytes | str) -> tuple[str, str | None]:
    """(model, origin) of a message; ValueError when it names no model."""
    text = data.decode() if isinstance(data, bytes) else data
    text = text.strip()
    if text.startswith("{"):
        body = json.loads(text)
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise ValueError(f"reload message without a model name: {text[:200]!r}")
        origin = body.get("origin")
        return model, origin if isinstance(origin, str) else None
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"reload message is neither JSON nor a model name: {text[:200]!r}")
    return text, None


def publish(url: str, channel: str, model: str, origin: str | None = None,
            timeout_s: float = 5.0) -> int:
    """Publish a reload of ``model`` (blocking); the number of subscribers that received it."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return int(client.publish(channel, message(model, origin)))
    finally:
        client.close()


async def publish_async(url: str, channel: str, model: str, timeout_s: float = 2.0) -> int:
    """The same from the event loop, as this process (its own listener skips it)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            return int(await client.publish(channel, message(model)))
    finally:
        await client.aclose()


OnReload = Callable[[str, bool], Awaitable[None]]


class ReloadListener:
    """Subscribes to ``channel`` and calls ``on_reload(model, catch_up=False)`` per message, and
    ``on_reload("", catch_up=True)`` after each reconnect; runs until :meth:`stop`."""

    def __init__(self, url: str, channel: str, on_reload: OnReload, metrics: Any, *,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 health_check_s: float = 5.0):
        self.url = url
        self.channel = channel
        self.on_reload = on_reload
        self.metrics = metrics
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.health_check_s = health_check_s
        self.connected = False
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reload-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._handlers):
            t.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _run(self) -> None:
        import redis.asyncio as aioredis

        backoff = Backoff(self.backoff_s, self.max_backoff_s)
        attempt = 0
        while True:
            attempt += 1
            client = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=5.0, health_check_interval=self.health_check_s)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._connected(True)
                log.info("subscribed to reload channel %r", self.channel)
                backoff.succeeded()
                if attempt > 1:
                    self._spawn("", True)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._handle(msg.get("data", b""))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect after a back-off
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._connected(False)
                self.metrics.reload_listener_reconnects.inc()
                delay = backoff.failed()
                log.warning("reload channel %r: %s; reconnecting in %.1f s", self.channel,
                            self.last_error, delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff.remaining_s())

    def _connected(self, on: bool) -> None:
        self.connected = on
        self.metrics.reload_listener_connected.set(1 if on else 0)

    def _handle(self, data: bytes | str) -> None:
        try:
            model, origin = parse_message(data)
        except ValueError as exc:
            self.metrics.reload_messages.labels("bad").inc()
            log.warning("reload channel %r: %s", self.channel, exc)
            return
        if origin == ORIGIN:
            self.metrics.reload_messages.labels("own").inc()
            return
        self.metrics.reload_messages.labels("reload").inc()
        self._spawn(model, False)

    def _spawn(self, model: str, catch_up: bool) -> None:
        # Off the read loop, so a long reload never delays reading the next message.
        task = asyncio.create_task(self.on_reload(model, catch_up))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
