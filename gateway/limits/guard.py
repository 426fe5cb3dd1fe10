"""The limits service the proxy calls: who is calling, may the request go now, and what it
finally cost. Built only when something is configured (client keys or any `limits:`), so
the open, unlimited default costs the hot path one `is None` check.

An admission charges every rate that applies (the key's, the route's, the upstream's: one
request, and the estimated tokens) all or nothing, refusing with 429; then takes a slot in
each concurrency pool on the way (key, route, then the upstream or the local backend),
waiting fairly or refusing with 503. On the way out it frees the slots and settles the
token charge on the answer's real usage.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from gateway.errors import Overloaded, RateLimited
from gateway.limits.clock import Clock
from gateway.limits.headers import rate_limit_headers
from gateway.limits.keys import ClientKey, KeyTable
from gateway.limits.memory import MemoryLimiter
from gateway.limits.pool import FairPool
from gateway.limits.rates import Charge, Limiter, Rate, Verdict, rates_for
from gateway.limits.settings import LimitSettings
from gateway.limits.tokens import estimate_tokens, used_tokens

if TYPE_CHECKING:
    from gateway.domain.exchange import Exchange
    from gateway.domain.view import RequestView
    from gateway.metrics import Metrics
    from gateway.settings import RouteSettings, Settings

log = logging.getLogger("understudy.limits")

Backend = Literal["cloud", "local"]
LOCAL_POOL = "local"
ANONYMOUS = "anonymous"


def limits_configured(settings: Settings) -> bool:
    scopes = [
        settings.upstream.limits,
        settings.local.limits,
        *(route.limits for route in settings.routes),
        *(upstream.limits for upstream in settings.upstreams.values()),
    ]
    return bool(settings.auth.keys) or any(limits is not None for limits in scopes)


def build_limiter(settings: Settings, clock: Clock | None) -> Limiter:
    memory = MemoryLimiter(clock)
    if not settings.redis_url:
        return memory
    from gateway.limits.redis import RedisLimiter

    return RedisLimiter(settings.redis_url, clock=clock, fallback=memory)


def warn_unkeyed_upstreams(settings: Settings) -> None:
    """With client keys, clients' own credentials are not forwarded: say so for upstreams
    that have no key of their own (fine for a local server, surprising for a cloud)."""
    upstreams = {"default": settings.upstream, **settings.upstreams}
    for name, upstream in upstreams.items():
        if upstream.api_key is None:
            log.warning(
                "client keys are configured and upstream %r has no api_key: it is called without one", name
            )


class Guard:
    def __init__(self, settings: Settings, metrics: Metrics, clock: Clock | None = None):
        self.metrics = metrics
        self.keys = KeyTable(settings.auth.keys) if settings.auth.keys else None
        if self.keys is not None:
            warn_unkeyed_upstreams(settings)
        self.limiter = build_limiter(settings, clock)
        self.rates: dict[str, tuple[Rate, ...]] = {}
        self.pools: dict[str, FairPool] = {}
        for key in settings.auth.keys:
            self._add_scope(f"key:{key.name}", key.limits)
        for route in settings.all_routes():
            self._add_scope(f"route:{route.name}", route.limits)
        upstreams = {"default": settings.upstream, **settings.upstreams}
        for name, upstream in upstreams.items():
            self._add_scope(f"upstream:{name}", upstream.limits)
        self._add_scope(LOCAL_POOL, settings.local.limits)

    def _add_scope(self, scope: str, limits: LimitSettings | None) -> None:
        self.rates[scope] = rates_for(scope, limits)
        pool = FairPool.from_limits(scope, limits)
        if pool is not None:
            self.pools[scope] = pool
            self.metrics.queue_depth.labels(scope).set_function(pool.queued)

    async def start(self) -> None:
        await self.limiter.start()

    async def close(self) -> None:
        await self.limiter.close()

    @property
    def requires_keys(self) -> bool:
        return self.keys is not None

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> ClientKey | None:
        """The caller's key (401 when keys are configured and it is missing or unknown)."""
        return self.keys.authenticate(headers) if self.keys is not None else None

    def admit(
        self,
        ex: Exchange,
        key: ClientKey | None,
        route: RouteSettings,
        view: RequestView,
        upstream: str,
        backend: Backend = "cloud",
    ) -> Admission:
        """An async context manager around one request's call to its backend."""
        target = f"upstream:{upstream}" if backend == "cloud" else LOCAL_POOL
        scopes = [f"key:{key.name}"] if key is not None else []
        scopes += [f"route:{route.name}", target]
        rates = [rate for scope in scopes for rate in self.rates.get(scope, ())]
        pools = [self.pools[scope] for scope in scopes if scope in self.pools]
        tokens = estimate_tokens(ex.endpoint, view.body) if any(r.unit == "tokens" for r in rates) else 0
        charges = [Charge(rate, 1 if rate.unit == "requests" else tokens) for rate in rates]
        return Admission(self, ex, charges, pools, ex.client or ANONYMOUS)

    def refuse(self, ex: Exchange, verdict: Verdict) -> RateLimited:
        rate = verdict.refused_by
        assert rate is not None
        self.metrics.rate_limited.labels(rate.scope).inc()
        wait = max(verdict.retry_after_s, 0.001)
        return RateLimited(
            f"rate limit reached for {rate.unit} on {rate.scope}: limit {rate.per_minute} per minute. "
            f"Please try again in {wait:.3g}s.",
            retry_after=wait,
        )


class Admission:
    __slots__ = ("_settled", "_taken", "charges", "ex", "guard", "pools", "tenant")

    def __init__(self, guard: Guard, ex: Exchange, charges: list[Charge], pools: list[FairPool], tenant: str):
        self.guard = guard
        self.ex = ex
        self.charges = charges
        self.pools = pools
        self.tenant = tenant
        self._taken: list[tuple[FairPool, float]] = []
        self._settled = False

    async def __aenter__(self) -> Admission:
        if self.charges:
            verdict = await self.guard.limiter.acquire(self.charges)
            self.ex.limit_headers = rate_limit_headers(verdict.quotas)
            if not verdict.allowed:
                raise self.guard.refuse(self.ex, verdict)
        pool = None
        try:
            for pool in self.pools:
                self._taken.append((pool, await pool.acquire(self.tenant)))
        except BaseException as exc:
            if isinstance(exc, Overloaded) and pool is not None:
                self.guard.metrics.rate_limited.labels(f"queue:{pool.name}").inc()
            self._release()
            # It never reached the backend: no tokens were used (the request still counts,
            # so a flooding client meets its own 429s rather than everyone's 503s).
            self._settled = True
            await self._adjust([Charge(c.rate, -c.amount) for c in self.charges if c.rate.unit == "tokens"])
            raise
        self.ex.settle = self.settle
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()
        if not self._settled:
            await self._settle(failed=exc_type is not None)

    async def settle(self) -> None:
        """Correct the token charge to the answer's real usage (once; called when the
        record is committed, before the response's last byte)."""
        if not self._settled:
            await self._settle(failed=False)

    async def _settle(self, failed: bool) -> None:
        self._settled = True
        await self._adjust(self._token_corrections(failed))

    def _token_corrections(self, failed: bool) -> list[Charge]:
        token_charges = [c for c in self.charges if c.rate.unit == "tokens"]
        if not token_charges:
            return []
        used = used_tokens(self.ex.usage)
        if used is None and not (failed or self.ex.status >= 400):
            return []  # an answer without usage (a stream without include_usage): keep the estimate
        return [Charge(c.rate, (used or 0) - c.amount) for c in token_charges if (used or 0) != c.amount]

    def _release(self) -> None:
        while self._taken:
            pool, taken_at = self._taken.pop()
            pool.release(taken_at)

    async def _adjust(self, corrections: list[Charge]) -> None:
        if corrections:
            await self.guard.limiter.adjust(corrections)
