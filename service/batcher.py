"""Dynamic batching: concurrent requests coalesced by rows into one model call.

:class:`MicroBatcher` knows nothing of HTTP or of the model: it is given a function
``run(dense, tokens) -> logits`` and calls it off the event loop with the rows of as many
waiting requests as fit in ``max_batch_rows`` (or whatever arrived within ``max_wait_ms`` of the
first one). Each caller gets its own rows back, in order. A request larger than a batch is split
into several parts. Admission is by rows: when ``max_queue_rows`` are already waiting, a new
request fails at once with :class:`QueueFull` (the server answers 503 with ``Retry-After``);
a request whose deadline has passed before its batch runs is dropped with
:class:`DeadlineExceeded` (504) and costs no compute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class BatcherError(Exception):
    """Base of the batcher's refusals."""


class QueueFull(BatcherError):
    def __init__(self, queued: int, limit: int, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the model's queue is full ({queued} rows waiting, limit {limit}); retry later"
        )


class DeadlineExceeded(BatcherError):
    pass


class ShuttingDown(BatcherError):
    pass


@dataclass
class BatchStats:
    """What one model call did; handed to the ``on_batch`` callback."""

    rows: int
    requests: int
    compute_s: float
    queue_wait_s: list[float]


@dataclass
class _Part:
    dense: np.ndarray  # (n, n_dense) float32
    tokens: np.ndarray  # (n, S) int64
    deadline: float  # time.monotonic()
    enqueued: float
    future: asyncio.Future[np.ndarray]
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.tokens)


class MicroBatcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_rows: int = 1024,
        max_wait_ms: float = 0.0,
        max_queue_rows: int = 65536,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "model",
    ):
        self._run = run
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._queue: deque[_Part] = deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # One thread: batches of one model run one after another; the next batch fills while the
        # current one computes, which is what makes batches grow under load.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._last_compute_s = 0.001

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, dense: np.ndarray, tokens: np.ndarray, deadline: float) -> np.ndarray:
        """Score ``tokens`` (N, S) / ``dense`` (N, n_dense) rows; returns logits (N,) float32.

        ``deadline`` is a ``time.monotonic()`` instant."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        self.start()
        n = len(tokens)
        if n == 0:
            return np.zeros(0, np.float32)
        if self._queued_rows + n > self.max_queue_rows:
            raise QueueFull(self._queued_rows, self.max_queue_rows, self._retry_after())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        parts = []
        for s in range(0, n, self.max_batch_rows):
            e = s + self.max_batch_rows
            parts.append(_Part(dense[s:e], tokens[s:e], deadline, now, loop.create_future()))
        self._queue.extend(parts)
        self._queued_rows += n
        self._depth_changed()
        assert self._wakeup is not None
        self._wakeup.set()
        futures = [p.future for p in parts]
        try:
            done = await asyncio.wait_for(
                asyncio.gather(*(asyncio.shield(f) for f in futures)),
                timeout=max(deadline - time.monotonic(), 0.0),
            )
        except TimeoutError:
            for p in parts:
                p.future.cancel()
            raise DeadlineExceeded("the request's deadline passed before it was scored") from None
        return done[0] if len(done) == 1 else np.concatenate(done)

    def _retry_after(self) -> float:
        batches = self._queued_rows / self.max_batch_rows + 1
        return max(batches * (self._last_compute_s + self.max_wait_s), 0.001)

    def _depth_changed(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(self._queued_rows)

    def _take(self) -> list[_Part]:
        """Parts for the next batch, in arrival order; drops cancelled and expired ones."""
        batch: list[_Part] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            p = self._queue[0]
            if p.future.done() or p.deadline <= now:
                self._queue.popleft()
                self._queued_rows -= p.rows
                if not p.future.done():
                    p.future.set_exception(
                        DeadlineExceeded("the request's deadline passed while it was queued")
                    )
                continue
            if batch and rows + p.rows > self.max_batch_rows:
                break
            self._queue.popleft()
            self._queued_rows -= p.rows
            batch.append(p)
            rows += p.rows
        self._depth_changed()
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0].enqueued
            wait_until = first + self.max_wait_s
            while self._queued_rows < self.max_batch_rows and not self._closing:
                left = wait_until - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            started = time.monotonic()
            try:
                if len(batch) == 1:
                    dense, tokens = batch[0].dense, batch[0].tokens
                else:
                    dense = np.concatenate([p.dense for p in batch])
                    tokens = np.concatenate([p.tokens for p in batch])
                logits = await loop.run_in_executor(self._executor, self._run, dense, tokens)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                logger.exception("model call failed for a batch of %d rows", sum(p.rows for p in batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            compute = time.monotonic() - started
            self._last_compute_s = compute
            logits = np.asarray(logits, np.float32).reshape(-1)
            s = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(logits[s : s + p.rows])
                s += p.rows
            if self._on_batch is not None:
                self._on_batch(
                    BatchStats(len(tokens), len(batch), compute, [started - p.enqueued for p in batch])
                )

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop."""
        self._closing = True
        if self._task is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)
