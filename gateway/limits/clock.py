"""The time source of limits and circuit breakers, injectable so tests can run a minute in
milliseconds. Its one method has the shape of `loop.time()`, which aiolimiter reads."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds on a monotonic scale (only differences matter)."""
        ...


class MonotonicClock:
    def time(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to (tests, simulations). Safe to advance from
    another thread than the one reading it."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._lock = threading.Lock()

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
