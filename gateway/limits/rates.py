"""The `Limiter` seam: what a rate limit is, what a request is charged, what the answer is.

Every limit is a leaky bucket (equivalently GCRA): it drains at `per_minute / 60` units a
second and holds at most `capacity` = `burst_s` seconds of that rate (at least one unit).
Worked example, `rpm: 30` with the default `burst_s: 10`: the bucket holds 5 requests, so 5
parallel requests pass at once, the next fits 2 s later (30/min drain one every 2 s), and
over any minute at most 30 + 5 pass; the long-run rate is 30 a minute. A charge fits when the
bucket has room for it; a charge larger than the whole capacity (a big TPM request) fits
only an empty bucket, which it then overfills, so later requests wait in proportion.
Two implementations: memory.py (one process) and redis.py (shared by replicas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.limits.settings import LimitSettings

Unit = Literal["requests", "tokens"]
# Float drift of a bucket that drained exactly to the brim must not refuse a request.
EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    """One configured limit on one scope (`key:alice`, `route:support`, `upstream:default`)."""

    scope: str
    unit: Unit
    per_minute: int
    burst_s: float
    # Derived once (read on every request): `scope:unit`, units a second, bucket size.
    name: str = field(init=False, compare=False)
    per_second: float = field(init=False, compare=False)
    capacity: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        per_second = self.per_minute / 60
        object.__setattr__(self, "name", f"{self.scope}:{self.unit}")
        object.__setattr__(self, "per_second", per_second)
        object.__setattr__(self, "capacity", max(per_second * self.burst_s, 1.0))

    def fits(self, level: float, amount: float) -> bool:
        return level + min(amount, self.capacity) <= self.capacity + EPSILON

    def wait_for(self, level: float, amount: float) -> float:
        """Seconds until `amount` fits a bucket at `level`."""
        return max(0.0, (level + min(amount, self.capacity) - self.capacity) / self.per_second)

    def quota(self, level: float) -> Quota:
        remaining = max(0, math.floor(self.capacity - level + EPSILON))
        return Quota(self, remaining, max(0.0, level) / self.per_second)


def rates_for(scope: str, limits: LimitSettings | None) -> tuple[Rate, ...]:
    if limits is None:
        return ()
    rates = []
    if limits.rpm is not None:
        rates.append(Rate(scope, "requests", limits.rpm, limits.burst_s))
    if limits.tpm is not None:
        rates.append(Rate(scope, "tokens", limits.tpm, limits.burst_s))
    return tuple(rates)


@dataclass(frozen=True, slots=True)
class Charge:
    rate: Rate
    amount: float


@dataclass(frozen=True, slots=True)
class Quota:
    """What a client is told about one limit: units it may send now, seconds to a full reset."""

    rate: Rate
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    quotas: tuple[Quota, ...]
    retry_after_s: float = 0.0
    refused_by: Rate | None = None


class Limiter(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, charges: Sequence[Charge]) -> Verdict:
        """All or nothing: take every charge, or none and say which limit refused and how
        long until this request would fit."""
        ...

    async def adjust(self, charges: Sequence[Charge]) -> None:
        """Correct earlier charges by these amounts (negative gives back); never refuses."""
        ...
