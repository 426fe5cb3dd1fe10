"""The gateway's services, built from the settings and started/stopped by the app's lifespan.

Everything stateful lives here, on `app.state.services`: no module globals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from gateway.limits.clock import Clock
from gateway.limits.guard import Guard, limits_configured
from gateway.metrics import Metrics
from gateway.proxy.exchange import usage_tokens
from gateway.routing import RouteTable
from gateway.settings import DEFAULT_UPSTREAM, Settings
from gateway.store import Store, open_store
from gateway.store.writer import LogWriter
from gateway.upstream import build_upstream
from gateway.upstream.resilience import ResilientUpstream, make_resilient

if TYPE_CHECKING:
    from gateway.local.supervisor import BackendSupervisor
    from gateway.proxy.exchange import Exchange

log = logging.getLogger("understudy")


class Services:
    def __init__(self, settings: Settings, clock: Clock | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.routes = RouteTable(settings.all_routes())
        self.upstreams: dict[str, ResilientUpstream] = {
            name: make_resilient(build_upstream(name, cfg), cfg, self.metrics, clock)
            for name, cfg in {DEFAULT_UPSTREAM: settings.upstream, **settings.upstreams}.items()
        }
        # None unless client keys or limits are configured: the open default pays nothing.
        self.guard = Guard(settings, self.metrics, clock) if limits_configured(settings) else None
        self.store: Store = open_store(settings.database_url, settings.data_dir)
        self.writer = LogWriter(
            self.store,
            max_batch=settings.log.max_batch,
            on_written=self.metrics.log_records.inc,
            on_lost=self.metrics.log_write_errors.inc,
        )
        self.metrics.log_queue_depth.set_function(lambda: self.writer.depth)
        self.backend: BackendSupervisor | None = None
        self.started = False

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.open)
        self.writer.start(asyncio.get_running_loop())
        for upstream in self.upstreams.values():
            await upstream.start()
        if self.guard is not None:
            await self.guard.start()
        if self.settings.manages_local_backend:
            from gateway.local.supervisor import BackendSupervisor

            self.backend = BackendSupervisor(self.settings)
            await self.backend.start()
        self.started = True
        log.info("understudy ready: %d routes, store %s", len(self.routes.routes), self.describe_store())

    async def stop(self) -> None:
        self.started = False
        if self.backend is not None:
            await self.backend.stop()
        for upstream in self.upstreams.values():
            await upstream.close()
        if self.guard is not None:
            await self.guard.close()
        await self.writer.close()
        await asyncio.to_thread(self.store.close)

    def describe_store(self) -> str:
        return (
            "postgresql"
            if self.settings.database_url
            else f"sqlite:{self.settings.data_dir / 'understudy.db'}"
        )

    async def commit(self, ex: Exchange) -> None:
        """Make the exchange's record durable (or spilled, if the store is failing), and
        settle its token charge: both before the response's last byte, so the client's next
        request already sees them."""
        if ex.settle is not None:
            await ex.settle()
        await self.writer.submit(ex.record())

    def client_name(self, scope: dict[str, Any]) -> str | None:
        client = scope.get("client")
        return client[0] if client else None

    def observe(self, ex: Exchange) -> None:
        metrics = self.metrics
        metrics.requests.labels(ex.route, ex.backend, str(ex.status)).inc()
        metrics.request_duration.labels(ex.route, ex.backend).observe(ex.latency_s)
        if ex.first_token_at is not None:
            metrics.ttft.labels(ex.route, ex.backend).observe(ex.first_token_at - ex.started)
        usage = ex.usage
        if usage:
            prompt, completion = usage_tokens(usage)
            if prompt:
                metrics.tokens.labels(ex.route, ex.backend, "prompt").inc(prompt)
            if completion:
                metrics.tokens.labels(ex.route, ex.backend, "completion").inc(completion)
