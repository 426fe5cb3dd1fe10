"""Traffic over time for the dashboard, sampled from the app's own Prometheus metrics.

Every `interval_s` the sampler reads `understudy_requests_total` and
`understudy_request_duration_seconds` and keeps, per route, what changed since the previous
sample: requests by backend, 5xx answers, and latency percentiles estimated from the
histogram's buckets (as Prometheus' `histogram_quantile` does). Nothing is added to the
request path; the history is this process's (all workers' in multiprocess mode), kept for
`keep` samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric

from gateway.metrics import PREFIX, Metrics

BACKENDS = ("cloud", "local", "failover")
_REQUESTS = f"{PREFIX}requests"
_DURATION = f"{PREFIX}request_duration_seconds"


@dataclass
class Point:
    t: float
    cloud: int = 0
    local: int = 0
    failover: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


@dataclass
class Snapshot:
    """Cumulative counters at one instant, per route."""

    requests: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    errors: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # route -> upper bound -> cumulative count (summed over backends)
    buckets: dict[str, dict[float, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )


def snapshot(families: Iterable[Metric]) -> Snapshot:
    snap = Snapshot()
    for family in families:
        if family.name == _REQUESTS:
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                route, backend, code = (sample.labels.get(k, "") for k in ("route", "backend", "code"))
                snap.requests[(route, backend)] += sample.value
                if code.startswith("5"):
                    snap.errors[route] += sample.value
        elif family.name == _DURATION:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    snap.buckets[sample.labels.get("route", "")][bound] += sample.value
    return snap


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The q-quantile from cumulative (upper bound, count) pairs, interpolating linearly
    inside the bucket (None without observations)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            inside = count - lower_count
            share = (rank - lower_count) / inside if inside > 0 else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta_point(t: float, route: str, before: Snapshot, after: Snapshot) -> Point:
    point = Point(t=t)
    for backend in BACKENDS:
        key = (route, backend)
        setattr(point, backend, max(0, round(after.requests.get(key, 0) - before.requests.get(key, 0))))
    point.errors = max(0, round(after.errors.get(route, 0) - before.errors.get(route, 0)))
    now, then = after.buckets.get(route, {}), before.buckets.get(route, {})
    cumulative = sorted((bound, max(0.0, count - then.get(bound, 0.0))) for bound, count in now.items())
    for attr, q in (("p50_ms", 0.5), ("p95_ms", 0.95)):
        value = quantile(q, cumulative)
        setattr(point, attr, None if value is None else round(value * 1000, 2))
    return point


class Timeline:
    """A ring of per-route traffic points, one every `interval_s` seconds."""

    def __init__(self, metrics: Metrics, interval_s: float = 5.0, keep: int = 720):
        self.metrics = metrics
        self.interval_s = interval_s
        self.keep = keep
        self.started_at = time.time()
        self.points: dict[str, deque[Point]] = {}
        self._last: Snapshot | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None) -> None:
        self.apply(snapshot(self.metrics.families()), now)

    def apply(self, current: Snapshot, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self._last is not None:
            routes = {route for route, _ in current.requests} | set(self.points)
            for route in routes:
                ring = self.points.setdefault(route, deque(maxlen=self.keep))
                ring.append(_delta_point(now, route, self._last, current))
        self._last = current

    def series(self, route: str) -> list[Point]:
        return list(self.points.get(route, ()))

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            # Reading the metrics (files, in multiprocess mode) off the loop; applying on it.
            current = await asyncio.to_thread(lambda: snapshot(self.metrics.families()))
            self.apply(current)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
