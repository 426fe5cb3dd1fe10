"""Prometheus metrics of the local backend, on a registry of its own (names `understudy_backend_*`)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PREFIX = "understudy_backend_"
_RATE_WINDOW_S = 10.0


class BackendMetrics:
    """All metrics of one backend process. Safe to update from the worker thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            _PREFIX + "requests", "HTTP requests answered", ["endpoint", "code"], registry=r
        )
        self.prompt_tokens = Counter(_PREFIX + "prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.tokens_generated = Counter(
            _PREFIX + "tokens_generated", "Completion tokens generated", ["model"], registry=r
        )
        self.queue_depth = Gauge(_PREFIX + "queue_depth", "Requests waiting for a batch", registry=r)
        self.running_sequences = Gauge(
            _PREFIX + "running_sequences", "Sequences in the running batch", registry=r
        )
        self.batch_size = Histogram(
            _PREFIX + "batch_size",
            "Sequences per generated batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.tokens_per_second = Gauge(
            _PREFIX + "tokens_per_second", "Generated tokens per second over the last 10 s", registry=r
        )
        self.time_to_first_token = Histogram(
            _PREFIX + "time_to_first_token_seconds", "Queueing plus prefill time", registry=r
        )
        self.cancelled = Counter(
            _PREFIX + "cancelled_requests", "Generations stopped because the client left", registry=r
        )
        self.rejected = Counter(
            _PREFIX + "rejected_requests", "Requests refused because the queue was full", registry=r
        )
        self.adapters_loaded = Gauge(_PREFIX + "adapters_loaded", "LoRA adapters loaded", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_total = 0
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._recent_rate)

    def record_step(self, model: str, tokens: int) -> None:
        """Count `tokens` generated in one decode step (feeds the tokens/s gauge)."""
        self.tokens_generated.labels(model).inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))
            self._recent_total += tokens

    def _recent_rate(self) -> float:
        """Tokens/s over the last 10 s, computed when scraped so an idle backend reads 0."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent_total -= self._recent.popleft()[1]
            if not self._recent:
                return 0.0
            return self._recent_total / max(now - self._recent[0][0], 1.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
