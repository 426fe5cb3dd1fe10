"""Every metric the README lists, on one registry per app (so tests can run several apps).

Labels are bounded: `route` comes from the config, `backend` and `code` from small fixed sets,
never raw model strings or user ids from clients.

Multi-process safe: when PROMETHEUS_MULTIPROC_DIR is set (prometheus_client's own switch, read
by it at import), every worker writes its values to files there and /metrics aggregates them
with the multiprocess collector; each gauge says how workers combine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

# LLM latencies span 5 ms (a cached or tiny answer) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
PREFIX = "understudy_"


def _cache_children(metric: Counter | Gauge | Histogram) -> None:
    """`metric.labels(*values)` from a dict after the first call: prometheus_client's own
    checks the names, converts and locks each time (about 3-6 µs, several per request). No
    child is ever removed from these metrics, so a cached one is always the registered one."""
    children: dict[tuple[object, ...], object] = {}
    labels = metric.labels

    def cached(*values: object, **named: object) -> object:
        if named:
            return labels(*values, **named)
        child = children.get(values)
        if child is None:
            child = children[values] = labels(*values)
        return child

    metric.labels = cached  # type: ignore[method-assign,assignment]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # Function-backed gauges are read at scrape time; in multiprocess mode they are copied
        # into their (file-backed) value just before each scrape instead.
        self._refreshers: list[Callable[[], None]] = []
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}requests", "Requests answered", ["route", "backend", "code"], registry=r
        )
        self.request_duration = Histogram(
            f"{PREFIX}request_duration_seconds",
            "Request latency, first byte in to last byte out",
            ["route", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time to the first streamed content chunk",
            ["route", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(f"{PREFIX}tokens", "Tokens processed", ["route", "backend", "kind"], registry=r)
        self.rate_limited = Counter(
            f"{PREFIX}rate_limited", "Requests refused by a limit", ["scope"], registry=r
        )
        self.inflight = Gauge(
            f"{PREFIX}inflight_requests",
            "Requests in flight",
            ["backend"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.route_mode = Gauge(
            f"{PREFIX}route_mode",
            "1 for the route's current mode",
            ["route", "mode"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.eval_score = Gauge(
            f"{PREFIX}eval_score",
            "Rolling mean judge score",
            ["route"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.evals = Counter(f"{PREFIX}evals", "Judged evaluations", ["route", "result"], registry=r)
        self.training_jobs = Counter(
            f"{PREFIX}training_jobs", "Training jobs by final status", ["route", "status"], registry=r
        )
        self.upstream_retries = Counter(f"{PREFIX}upstream_retries", "Upstream calls retried", registry=r)
        self.circuit_open = Gauge(
            f"{PREFIX}circuit_open",
            "1 while the upstream's circuit breaker is open",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.queue_depth = Gauge(
            f"{PREFIX}queue_depth",
            "Requests waiting for a concurrency slot",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.log_records = Counter(f"{PREFIX}log_records", "Log records committed to the store", registry=r)
        self.log_write_errors = Counter(
            f"{PREFIX}log_write_errors", "Log records lost (could not be written)", registry=r
        )
        self.event_loop_tasks = Gauge(
            f"{PREFIX}event_loop_tasks",
            "asyncio tasks alive in the gateway's event loop (flat under steady load: no leak)",
            registry=r,
            multiprocess_mode="livesum",
        )
        if not self.multiprocess_dir:  # process_resident_memory_bytes, process_open_fds, ...
            ProcessCollector(registry=r)
        self.log_queue_depth = Gauge(
            f"{PREFIX}log_queue_depth",
            "Log records waiting for the store",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cost = Counter(
            f"{PREFIX}cost_usd",
            "Estimated upstream spend in USD (litellm's price map; local answers cost 0)",
            ["route", "backend"],
            registry=r,
        )
        self.cost_saved = Counter(
            f"{PREFIX}cost_saved_usd",
            "Estimated USD the cloud would have charged for the answers served locally",
            ["route"],
            registry=r,
        )

        self.local_skipped = Counter(
            f"{PREFIX}local_skipped",
            "Requests on a locally served route that the cloud answered because the local model "
            "cannot serve them (reason: non_text_content, unsupported_parameter, context_length, "
            "tools_mismatch, backend_down)",
            ["route", "reason"],
            registry=r,
        )
        self.local_fallbacks = Counter(
            f"{PREFIX}local_fallbacks",
            "Local answers that failed before their first byte and were answered by the cloud",
            ["route", "reason"],
            registry=r,
        )
        self.judge_cost = Counter(
            f"{PREFIX}judge_cost_usd",
            "Estimated USD spent on the gateway's own cloud calls for a route (judging, spot checks)",
            ["route"],
            registry=r,
        )
        self.local_selftest_ok = Gauge(
            f"{PREFIX}local_selftest_ok",
            "1 when the local backend generated with a LoRA adapter at start-up; 0 when it could "
            "not (training is held: an adapter could never be served); NaN until the backend has "
            "answered",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.local_selftest_ok.set(float("nan"))
        self.route_pending_pairs = Gauge(
            f"{PREFIX}route_pending_pairs",
            "Usable pairs (real, imported, synthetic) a route has collected towards its next "
            "training job; the job starts at policy.min_samples",
            ["route"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.route_blocked = Gauge(
            f"{PREFIX}route_blocked",
            "1 while a route cannot make progress in its cycle (reason: selftest, training_failed, rejected)",
            ["route", "reason"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Those touched by every request: their labelled children looked up in a dict.
        for metric in (
            self.requests,
            self.request_duration,
            self.ttft,
            self.tokens,
            self.inflight,
            self.cost,
            self.cost_saved,
        ):
            _cache_children(metric)

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make `gauge` report `read()` at each scrape."""
        if self.multiprocess_dir:
            self._refreshers.append(lambda: gauge.set(read()))
        else:
            gauge.set_function(read)

    def declare_routes(self, cloud_only: Iterable[str]) -> None:
        """Routes that never adapt are always in mode `cloud`: say so, like adaptive ones."""
        for route in cloud_only:
            self.route_mode.labels(route, "cloud").set(1)

    def _scraped_registry(self) -> CollectorRegistry:
        if not self.multiprocess_dir:
            return self.registry
        for refresh in self._refreshers:
            refresh()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return registry

    def families(self) -> Iterable[Metric]:
        """Every metric family as a scrape sees it (all workers' in multiprocess mode)."""
        return self._scraped_registry().collect()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self._scraped_registry()), CONTENT_TYPE_LATEST
