"""Back-off for a failing dependency (the Redis feature store, the prediction cache): after a
failure it is skipped for ``base_s``, doubling up to ``max_s`` while failures continue; the next
success starts over. Callers check :attr:`Backoff.open` before a call and report its outcome."""

from __future__ import annotations

import time


class Backoff:
    def __init__(self, base_s: float, max_s: float):
        self.base_s = float(base_s)
        self.max_s = float(max_s)
        self._until = 0.0
        self._next = self.base_s

    @property
    def open(self) -> bool:
        """True when the dependency may be tried (no pause running)."""
        return time.monotonic() >= self._until

    def remaining_s(self) -> float:
        """Seconds left of the current pause (0 when none)."""
        return max(0.0, self._until - time.monotonic())

    def failed(self) -> float:
        """Start a pause; returns its length in seconds."""
        pause = self._next
        self._until = time.monotonic() + pause
        self._next = min(self._next * 2, self.max_s)
        return pause

    def succeeded(self) -> None:
        self._next = self.base_s
