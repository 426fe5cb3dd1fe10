"""In-flight caps with a bounded wait queue that is fair across clients.

A pool lets `capacity` requests run at once. Others wait in one sub-queue per client key;
a freed slot goes to the next key in round-robin order (oldest request of that key), so a
key that floods the queue gets its share and no more. A full queue, or a wait longer than
`queue_timeout_s`, is refused at once with 503 Overloaded and a Retry-After estimate:
the caller never hangs and never sees a 500.
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.errors import Overloaded
from gateway.limits.settings import LimitSettings

# Weight of the newest sample in the moving average of slot hold times.
_EWMA_WEIGHT = 0.2


class FairPool:
    def __init__(self, name: str, capacity: int, max_queue: int, queue_timeout_s: float):
        self.name = name
        self.capacity = capacity
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self.depth = 0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._turns: deque[str] = deque()
        self._mean_hold_s = 1.0

    @classmethod
    def from_limits(cls, name: str, limits: LimitSettings | None) -> FairPool | None:
        if limits is None or limits.max_concurrency is None:
            return None
        return cls(name, limits.max_concurrency, limits.max_queue, limits.queue_timeout_s)

    async def acquire(self, tenant: str) -> float:
        """Take a slot (waiting fairly if need be); returns the loop time it was taken at,
        to hand back to `release`. Raises Overloaded when the queue is full or the wait ends."""
        loop = asyncio.get_running_loop()
        if self.inflight < self.capacity and not self.depth:
            self.inflight += 1
            return loop.time()
        if self.depth >= self.max_queue:
            raise Overloaded(
                f"{self.name} is at capacity and its wait queue is full", retry_after=self.retry_after()
            )
        waiter: asyncio.Future[None] = loop.create_future()
        self._enqueue(tenant, waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except BaseException as exc:
            self._give_up(tenant, waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"{self.name} is at capacity: no slot within {self.queue_timeout_s:g} s",
                    retry_after=self.retry_after(),
                ) from None
            raise
        return loop.time()

    def release(self, taken_at: float) -> None:
        held = asyncio.get_running_loop().time() - taken_at
        self._mean_hold_s += _EWMA_WEIGHT * (held - self._mean_hold_s)
        self._hand_over()

    def queued(self) -> float:
        return float(self.depth)

    def retry_after(self) -> float:
        """When a refused client may find room: the queue ahead of it, drained at the rate
        slots have been freed."""
        return self._mean_hold_s * (self.depth + 1) / self.capacity

    def _enqueue(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            queue = self._waiting[tenant] = deque()
            self._turns.append(tenant)
        queue.append(waiter)
        self.depth += 1

    def _give_up(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            # The slot was handed over just as the wait ended: pass it on, not lose it.
            self._hand_over()
            return
        queue = self._waiting.get(tenant)
        if queue is None or waiter not in queue:
            return  # already skipped by `_hand_over` (it was cancelled before we got here)
        queue.remove(waiter)
        self.depth -= 1
        if not queue:
            del self._waiting[tenant]
            self._turns.remove(tenant)

    def _hand_over(self) -> None:
        """A slot was freed: give it straight to the next tenant's oldest waiter, if any."""
        while self._turns:
            tenant = self._turns.popleft()
            queue = self._waiting[tenant]
            waiter = queue.popleft()
            self.depth -= 1
            if queue:
                self._turns.append(tenant)
            else:
                del self._waiting[tenant]
            if not waiter.done():
                waiter.set_result(None)
                return
        self.inflight -= 1
