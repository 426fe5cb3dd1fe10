"""Who answers a request: the route's local adapter, the cloud, or the local model covering
for a failing cloud. Decided once per request, here and nowhere else.

The proxy edge asks `plan()` before it queues the request (the plan names the pool it waits
in) and hands the same plan to `send()`, which carries it out:

    plan.local     → the local adapter answers; any failure before its first byte, a 4xx
                     included, falls back to the cloud (counted, and noted on the record)
    otherwise      → the cloud answers; if it fails before its first byte (unreachable,
                     timeout, open circuit, 5xx) and `plan.failover` names an adapter, that
                     adapter answers instead, marked `failover`
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.adaptive.eligibility import BACKEND_DOWN, ineligible_reason
from gateway.domain import LOCAL_ENDPOINT
from gateway.domain.exchange import Exchange
from gateway.domain.view import RequestView
from gateway.errors import CircuitOpen, GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.local.client import LocalBackendError
from gateway.metrics import Metrics
from gateway.upstream.base import Upstream, UpstreamRequest, UpstreamResponse

if TYPE_CHECKING:
    from gateway.adaptive.controller import AdaptiveController

log = logging.getLogger("understudy.dispatch")

FAILOVER_ERRORS = (UpstreamUnreachable, UpstreamTimeout, CircuitOpen)
_LOCAL_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class Plan:
    """Who answers one request. `skipped` says why the local model may not, when it could
    otherwise have (a reason from `gateway.adaptive.eligibility`)."""

    local: str | None = None
    failover: str | None = None
    skipped: str | None = None

    @property
    def pool(self) -> Literal["local", "cloud"]:
        """The concurrency pool the request waits in."""
        return "local" if self.local is not None else "cloud"


CLOUD = Plan()


class LocalFailed(GatewayError):
    """The local backend could not answer; `reason` is a metric label."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Dispatcher:
    def __init__(
        self,
        controller: AdaptiveController | None,
        local_upstream: Upstream | None,
        metrics: Metrics,
        local_up: Callable[[], bool],
    ):
        self.controller = controller
        self.local_upstream = local_upstream
        self.metrics = metrics
        self.local_up = local_up

    def plan(self, route: str, endpoint: str, view: RequestView) -> Plan:
        controller = self.controller
        if controller is None or endpoint != LOCAL_ENDPOINT or view.body is None:
            return CLOUD
        serving, failover = controller.serving(route), controller.failover_adapter(route)
        adapter = serving or failover
        if adapter is None:
            return CLOUD
        reason = ineligible_reason(view.body, controller.traits(adapter), controller.local_context)
        if reason is None and not self.local_up():
            reason = BACKEND_DOWN
        if reason is None:
            return Plan(local=serving, failover=failover)
        if serving is None:  # only failover was possible: nothing the local model would have answered
            return CLOUD
        self.metrics.local_skipped.labels(route, reason).inc()
        return Plan(skipped=reason)

    async def send(
        self, ex: Exchange, plan: Plan, upstream: Upstream, request: UpstreamRequest
    ) -> UpstreamResponse:
        ex.local_skip = plan.skipped
        if plan.skipped == BACKEND_DOWN:  # known down: no attempt, and the record says why
            ex.error = "the local backend is restarting; the cloud answered"
        if plan.local is not None:
            try:
                return await self._send_local(ex, request, plan.local, "local")
            except LocalFailed as exc:
                log.warning("route %s: local backend failed (%s); the cloud answers", ex.route, exc.message)
                self.metrics.local_fallbacks.labels(ex.route, exc.reason).inc()
                ex.local_skip = f"fallback:{exc.reason}"
                ex.error = f"local backend failed ({exc.message}); the cloud answered"
        try:
            response = await upstream.send(request)
        except FAILOVER_ERRORS as exc:
            return await self._failover(ex, plan, request, exc)
        if response.status >= 500 and plan.failover is not None:
            response.close()
            cause = UpstreamUnreachable(f"upstream answered {response.status}")
            return await self._failover(ex, plan, request, cause)
        return response

    async def _failover(
        self, ex: Exchange, plan: Plan, request: UpstreamRequest, cause: GatewayError
    ) -> UpstreamResponse:
        if plan.failover is None:
            raise cause
        try:
            response = await self._send_local(ex, request, plan.failover, "failover")
        except LocalFailed:
            raise cause from None
        log.warning("route %s: cloud failed (%s); answered by %s", ex.route, cause.message, plan.failover)
        return response

    async def _send_local(
        self, ex: Exchange, request: UpstreamRequest, adapter: str, label: str
    ) -> UpstreamResponse:
        assert self.controller is not None and self.local_upstream is not None
        try:
            await self.controller.ensure_loaded(ex.route, adapter)
        except LocalBackendError as exc:  # e.g. restarting after a crash: not up yet
            raise LocalFailed(str(exc), "unreachable") from None
        local_request = UpstreamRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=dict(_LOCAL_HEADERS),
            body=request.view.with_model(adapter),
            view=request.view,
        )
        try:
            response = await self.local_upstream.send(local_request)
        except GatewayError as exc:
            raise LocalFailed(exc.message, "unreachable") from None
        if response.status >= 400:
            # Before the first byte nothing is lost: the cloud answers what the local model
            # refused (a prompt beyond its context, a schema it cannot compile) or failed.
            response.close()
            kind = "status_4xx" if response.status < 500 else "status_5xx"
            raise LocalFailed(f"local backend answered {response.status}", kind)
        self.metrics.inflight.labels(ex.backend).dec()
        ex.backend, ex.upstream_model = label, adapter
        self.metrics.inflight.labels(label).inc()
        return response
