"""In-process limits: one aiolimiter leaky bucket per limit, read on an injectable clock.

Admission never waits (over the limit is a 429, not a queue), so the buckets are only asked
`has_capacity` and then `acquire`d, which cannot block once capacity was confirmed; nothing
awaits in between, so a multi-limit admission is atomic on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiolimiter import AsyncLimiter

from gateway.limits.clock import Clock, MonotonicClock
from gateway.limits.rates import Charge, Quota, Rate, Verdict


class Bucket(AsyncLimiter):
    """aiolimiter's bucket with two additions it lacks: reading the level (for headers) and
    correcting it after the fact (TPM is charged on an estimate, settled on real usage).
    Both use aiolimiter 1.x internals (`_leak`, `_level`); tests cover them."""

    __slots__ = ("_clock",)

    def __init__(self, rate: Rate, clock: Clock):
        super().__init__(rate.capacity, rate.capacity / rate.per_second)
        self._clock = clock

    @property  # type: ignore[override]
    def _loop(self) -> Any:
        # aiolimiter reads time through `loop.time()`; these buckets never wait (no futures,
        # no timers), so the injected clock is all the "loop" they need.
        return self._clock

    @property
    def level(self) -> float:
        self._leak()
        return self._level

    @property
    def level_as_of_last_check(self) -> float:
        """The level without draining it again (right after `acquire`, which just did)."""
        return self._level

    def add(self, amount: float) -> None:
        """Raise (or, negative, lower) the level; above capacity means the bucket owes."""
        self._leak()
        self._level = max(0.0, self._level + amount)


class MemoryLimiter:
    def __init__(self, clock: Clock | None = None):
        self.clock = clock or MonotonicClock()
        self._buckets: dict[str, Bucket] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def bucket(self, rate: Rate) -> Bucket:
        bucket = self._buckets.get(rate.name)
        if bucket is None:
            bucket = self._buckets[rate.name] = Bucket(rate, self.clock)
        return bucket

    async def acquire(self, charges: Sequence[Charge]) -> Verdict:
        buckets = [self.bucket(charge.rate) for charge in charges]
        for charge, bucket in zip(charges, buckets, strict=True):
            if not bucket.has_capacity(min(charge.amount, charge.rate.capacity)):
                return self._refusal(charges, buckets, charge)
        quotas = []
        for charge, bucket in zip(charges, buckets, strict=True):
            fitting = min(charge.amount, charge.rate.capacity)
            await bucket.acquire(fitting)
            if charge.amount > fitting:
                bucket.add(charge.amount - fitting)
            quotas.append(charge.rate.quota(bucket.level_as_of_last_check))
        return Verdict(True, tuple(quotas))

    @staticmethod
    def _refusal(charges: Sequence[Charge], buckets: list[Bucket], refused: Charge) -> Verdict:
        quotas: list[Quota] = []
        wait = 0.0
        for charge, bucket in zip(charges, buckets, strict=True):
            level = bucket.level
            quotas.append(charge.rate.quota(level))
            if not charge.rate.fits(level, charge.amount):
                wait = max(wait, charge.rate.wait_for(level, charge.amount))
        return Verdict(False, tuple(quotas), retry_after_s=wait, refused_by=refused.rate)

    async def adjust(self, charges: Sequence[Charge]) -> None:
        for charge in charges:
            self.bucket(charge.rate).add(charge.amount)
