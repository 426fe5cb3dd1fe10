"""`create_app(settings)`: the ASGI app. No work at import; everything hangs off app.state.

The middleware stack is explicit: /v1/* goes straight to the proxy handler (the hot path,
its own error mapping); everything else passes the Host and Origin checks (`gateway.origin`)
and goes through Starlette's router, with one handler mapping GatewayError to the OpenAI
error shape. Slow and idle connections are handled below the app, in uvicorn's protocol
(`gateway.web.connections`, set up by `understudy serve`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from gateway.errors import GatewayError
from gateway.limits.clock import Clock
from gateway.origin import ALLOWED_HOSTS, AllowedHosts, refuse_cross_origin
from gateway.proxy.handler import ProxyHandler
from gateway.services import Services
from gateway.settings import Settings
from gateway.web import admin, health
from gateway.web.auth import Sessions
from gateway.web.common import (
    STORE_FAILURES,
    error_response,
    handle_gateway_error,
    handle_http_error,
    handle_store_failure,
)
from gateway.web.timeline import Timeline

# Dashboard sessions ended by a sign-out, under the data dir (see web.auth.Sessions).
SESSIONS_FILE = "ui-sessions-revoked.json"


class UnderstudyApp:
    def __init__(self, settings: Settings, clock: Clock | None = None, freeze_gc: bool = False):
        self.settings = settings
        self.freeze_gc = freeze_gc
        self.services = Services(settings, clock)
        self.proxy = ProxyHandler(self.services)
        self.timeline = Timeline(self.services.metrics)
        self.web = Starlette(
            routes=[*health.routes, *admin.routes],
            exception_handlers={
                GatewayError: handle_gateway_error,
                HTTPException: handle_http_error,
                **dict.fromkeys(STORE_FAILURES, handle_store_failure),
            },
            lifespan=self._lifespan,
        )
        self.web.state.services = self.services
        self.web.state.timeline = self.timeline
        self.web.state.sessions = Sessions(settings.ui.session_ttl_s, settings.data_dir / SESSIONS_FILE)
        self.allowed_hosts = AllowedHosts(settings.server_names)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.services.start()
        self.timeline.start()
        if self.freeze_gc:
            # Everything alive now lives as long as the process: out of the collector's sight,
            # so a full collection scans only what requests create (p99 at concurrency 32:
            # 31 -> 19 ms in bench/ab_compare.py; docs/PROFILING.md).
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await self.timeline.stop()
            await self.services.stop()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            # The proxy checks Host and Origin itself, inside its logged path (every /v1
            # request is logged, refusals included); the rest is checked here.
            scope[ALLOWED_HOSTS] = self.allowed_hosts
            if scope["path"].startswith("/v1/"):
                await self.proxy(scope, receive, send)
                return
            try:
                refuse_cross_origin(scope)
            except GatewayError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.web(scope, receive, send)


def create_app(settings: Settings, clock: Clock | None = None, freeze_gc: bool = False) -> UnderstudyApp:
    """The app; `clock` drives rate limits and breakers (tests inject a manual one).
    `freeze_gc`: the app owns its process (`understudy serve`), so what exists once it has
    started is frozen out of the cyclic collector's scans."""
    return UnderstudyApp(settings, clock, freeze_gc)
