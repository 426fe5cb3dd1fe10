"""The gateway's services, built from the settings and started/stopped by the app's lifespan.

Everything stateful lives here, on `app.state.services`: no module globals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from gateway.adaptive.controller import AdaptiveController
from gateway.adaptive.dispatch import Dispatcher
from gateway.domain import LOCAL_ENDPOINT
from gateway.domain.exchange import Exchange, usage_tokens
from gateway.domain.view import RequestView
from gateway.errors import GatewayError, UpstreamUnreachable
from gateway.limits.clock import Clock
from gateway.limits.guard import Guard, limits_configured
from gateway.local.client import LocalBackendClient
from gateway.local.supervisor import BackendSupervisor
from gateway.metrics import Metrics
from gateway.pricing import CostMeter, PriceBook, cached_tokens
from gateway.routing import RouteTable
from gateway.settings import DEFAULT_UPSTREAM, Settings, UpstreamSettings
from gateway.store import Store, open_store
from gateway.store.writer import LogWriter
from gateway.upstream import Upstream, UpstreamRequest, build_upstream
from gateway.upstream.resilience import ResilientUpstream, make_resilient

log = logging.getLogger("understudy")


async def _send_read(upstream: Upstream, request: UpstreamRequest) -> tuple[int, bytes]:
    response = await upstream.send(request)
    return response.status, await response.read()


def local_upstream_settings(settings: Settings) -> UpstreamSettings:
    """The local backend as an OpenAI-compatible upstream. Its placeholder key means a
    client's own key is never handed to the local process."""
    return UpstreamSettings(base_url=settings.local_base_url, api_key="understudy-local", read_timeout_s=600)


class Services:
    def __init__(self, settings: Settings, clock: Clock | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.costs = CostMeter(self.metrics, PriceBook(overrides=settings.pricing))
        self.routes = RouteTable(settings.all_routes())
        self.upstreams: dict[str, ResilientUpstream] = {
            name: make_resilient(build_upstream(name, cfg), cfg, self.metrics, clock)
            for name, cfg in {DEFAULT_UPSTREAM: settings.upstream, **settings.upstreams}.items()
        }
        # None unless client keys or limits are configured: the open default pays nothing.
        self.guard = Guard(settings, self.metrics, clock) if limits_configured(settings) else None
        self.store: Store = open_store(settings.store_url)
        self.writer = LogWriter(
            self.store,
            max_batch=settings.log.max_batch,
            spill_limit=settings.log.spill_limit,
            warn_depth=settings.log.queue_warn_depth,
            on_written=self.metrics.log_records.inc,
            on_lost=self.metrics.log_write_errors.inc,
        )
        self.costs.ledger = self.writer.add_cost
        self.metrics.track(self.metrics.log_queue_depth, lambda: self.writer.depth)
        self.metrics.track(self.metrics.event_loop_tasks, self._loop_tasks)
        self.backend: BackendSupervisor | None = None
        self.local_upstream: Upstream | None = None
        self.local_client: LocalBackendClient | None = None
        self.controller: AdaptiveController | None = None
        if settings.local.enabled:
            self.local_upstream = build_upstream("local", local_upstream_settings(settings))
            self.local_client = LocalBackendClient(settings.local_base_url)
            if any(route.adapt for route in settings.all_routes()):
                self.controller = AdaptiveController(
                    settings, self.store, self.metrics, self.local_client, self.call_cloud
                )
                self.controller.pays_for_own_calls = self.pays_for_own_calls
                self.controller.price_answer = self.price_answer
        self.dispatcher = Dispatcher(
            self.controller, self.local_upstream, self.metrics, lambda: self.local_up
        )
        self.metrics.declare_routes(r.name for r in self.routes.routes if not (r.adapt and self.controller))
        self.started = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.open)
        await asyncio.to_thread(self.costs.prices.load)  # so no request pays for reading it
        self.loop = asyncio.get_running_loop()
        self.writer.start(self.loop)
        for upstream in self.upstreams.values():
            await upstream.start()
        if self.guard is not None:
            await self.guard.start()
        if self.settings.manages_local_backend:
            self.backend = BackendSupervisor(
                self.settings, on_spawn=self._local_restarted, on_healthy=self._local_healthy
            )
            await self.backend.start()
        if self.local_upstream is not None and self.local_client is not None:
            await self.local_upstream.start()
            await self.local_client.start()
        if self.controller is not None:
            await self.controller.start()
        self.started = True
        log.info("understudy ready: %d routes, store %s", len(self.routes.routes), self.describe_store())

    async def stop(self) -> None:
        self.started = False
        for task in list(self._background):
            task.cancel()
        if self.controller is not None:
            await self.controller.stop()
        if self.local_upstream is not None and self.local_client is not None:
            await self.local_upstream.close()
            await self.local_client.close()
        if self.backend is not None:
            await self.backend.stop()
        for upstream in self.upstreams.values():
            await upstream.close()
        if self.guard is not None:
            await self.guard.close()
        await self.writer.close()
        await asyncio.to_thread(self.store.close)

    def describe_store(self) -> str:
        return self.store.describe()

    async def commit(self, ex: Exchange) -> None:
        """Make the exchange's record durable (or spilled, if the store is failing), and
        settle its token charge: both before the response's last byte, so the client's next
        request already sees them."""
        if ex.settle is not None:
            await ex.settle()
        await self.writer.submit(ex.record())

    @property
    def local_up(self) -> bool:
        """False while the supervised local backend is known to be down (an external one is
        assumed up: its failures show per request)."""
        return self.backend is None or self.backend.healthy.is_set()

    def _loop_tasks(self) -> int:
        return 0 if self.loop is None else len(asyncio.all_tasks(self.loop))

    def _local_restarted(self) -> None:
        if self.local_client is not None:
            self.local_client.forget_loaded()

    def _local_healthy(self) -> None:
        """A (re)started backend answers: learn its context and its LoRA self-test result."""
        if self.controller is not None:
            self.controller.spawn(self.controller.check_local_backend())
        elif self.local_client is not None:
            task = asyncio.create_task(self._read_self_test(self.local_client))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _read_self_test(self, client: LocalBackendClient) -> None:
        error = await client.self_test_error()
        self.metrics.local_selftest_ok.set(0 if error else 1)
        if error:
            log.error("the local backend cannot generate with an adapter: %s", error)

    def price_answer(self, answer: dict[str, Any]) -> float:
        """What a chat answer cost at the cloud's prices (0 for a model the map lacks)."""
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        prompt, completion = usage_tokens(usage)
        model = str(answer.get("model") or "")
        return self.costs.prices.cost(model, prompt or 0, completion or 0, cached_tokens(usage))

    def pays_for_own_calls(self, route_name: str) -> bool:
        """True when the route's upstream has a key of its own, so the gateway can make calls
        that no client request pays for (held-out evals)."""
        return self.upstreams[self.routes.by_name[route_name].upstream].api_key is not None

    async def call_cloud(
        self, route_name: str, body: dict[str, Any], kind: str, authorization: str | None = None
    ) -> dict[str, Any]:
        """A chat completion the gateway makes for itself (a judge's grading, a spot check's
        reference answer): through the route's upstream, logged with its `kind`, never counted
        as user traffic. It pays with the upstream's key, else with `authorization`, the
        credentials of the client request it is about (held by the caller in memory only).
        Raises GatewayError unless the upstream answers 200 with JSON."""
        route = self.routes.by_name[route_name]
        upstream = self.upstreams[route.upstream]
        if route.upstream_model and kind != "judge":
            body = {**body, "model": route.upstream_model}
        headers = {"content-type": "application/json"}
        if upstream.api_key is not None:
            headers["authorization"] = f"Bearer {upstream.api_key}"
        elif authorization:
            headers["authorization"] = authorization
        raw = orjson.dumps(body)
        ex = Exchange(method="POST", endpoint=LOCAL_ENDPOINT, route=route_name, kind=kind)
        ex.model, ex.request_text = str(body.get("model")), raw.decode()
        view = RequestView(body=body, model=ex.model)
        request = UpstreamRequest("POST", "/chat/completions", "", headers, raw, view)
        try:
            if self.guard is None:
                ex.status, payload = await _send_read(upstream, request)
            else:  # the gateway's own calls obey the route's and upstream's limits too
                async with self.guard.admit(ex, None, route, view, route.upstream):
                    ex.status, payload = await _send_read(upstream, request)
        except GatewayError as exc:
            ex.status, ex.outcome, ex.error = exc.status, "error", exc.message
            await self.commit(ex)
            raise
        ex.response_text = payload.decode("utf-8", "replace")
        try:
            answer = orjson.loads(payload) if ex.status == 200 else None
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            ex.outcome, ex.error = "error", f"upstream answered {ex.status}"
            await self.commit(ex)
            raise UpstreamUnreachable(f"upstream answered {ex.status} to a {kind} call")
        ex.usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        tokens = usage_tokens(ex.usage)
        spent = self.costs.record(route, "cloud", ex.model, *tokens, cached_tokens(ex.usage), own_call=True)
        self.metrics.judge_cost.labels(route_name).inc(spent)
        await self.commit(ex)
        return answer

    def client_name(self, scope: dict[str, Any]) -> str | None:
        client = scope.get("client")
        return client[0] if client else None

    def observe(self, ex: Exchange) -> None:
        if self.controller is not None and ex.kind == "user":
            # A truncated answer is still evidence: the reference is asked with the same max_tokens.
            ok = ex.status == 200 and ex.outcome in ("ok", "truncated")
            self.controller.observe(ex, ok)
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
            if ex.status < 400:
                model = ex.model if ex.backend != "cloud" else ex.upstream_model or ex.model
                route = self.routes.by_name[ex.route]
                self.costs.record(
                    route, ex.backend, model, prompt, completion, cached_tokens(usage), client=ex.client
                )
