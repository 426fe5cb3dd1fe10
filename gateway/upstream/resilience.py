"""Retries and a circuit breaker around any `Upstream`.

Retried (tenacity: exponential back-off, full jitter): connection failures, connect
timeouts, 429 (waiting at least the upstream's Retry-After; a longer one than
`retry_after_cap_s` is not waited for, the 429 goes back as is) and 5xx. Only before any
byte went to the client: `send` returns once status and headers are in, and a whole
(non-stream) answer is read inside the attempt, so a body cut short is retried too; a
stream that fails after it began is never retried. A read timeout is not retried (the
upstream may still be working on it). The last attempt's answer or error is what the
client gets.

The breaker counts consecutive failed attempts (connection errors, timeouts, 5xx). At
`failure_threshold` it opens: calls fail fast with 503 CircuitOpen. After `cooldown_s` the
next call is let through as a probe; its success closes the circuit, its failure re-opens
it. `breaker.is_open` tells others (failover) that a call would fail fast now.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from gateway.errors import CircuitOpen, GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.limits.clock import Clock, MonotonicClock
from gateway.limits.settings import BreakerSettings, RetrySettings
from gateway.upstream.base import Upstream, UpstreamRequest, UpstreamResponse
from gateway.upstream.openai_compat import CONNECT_TIMEOUT_CODE

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.settings import UpstreamSettings

log = logging.getLogger("understudy.upstream")

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        clock: Clock | None = None,
        on_change: Callable[[bool], None] | None = None,
    ):
        self.name = name
        self.threshold = settings.failure_threshold
        self.cooldown_s = settings.cooldown_s
        self.clock = clock or MonotonicClock()
        self.state: BreakerState = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._on_change = on_change

    @property
    def is_open(self) -> bool:
        """True while a call would fail fast: open and cooling down, or half-open with its
        probe in flight."""
        if self.state == "closed":
            return False
        return self.state == "half_open" or self._cooldown_left() > 0

    def before_call(self) -> bool:
        """Admit a call (True if it is the half-open probe) or raise CircuitOpen."""
        if self.state == "closed":
            return False
        if self.state == "open" and self._cooldown_left() <= 0:
            self.state = "half_open"
            return True
        retry_after = self._cooldown_left() if self.state == "open" else 1.0
        raise CircuitOpen(
            f"upstream {self.name!r} is failing; calls are paused (circuit open)", retry_after=retry_after
        )

    def record_success(self) -> None:
        self.failures = 0
        if self.state != "closed":
            self.state = "closed"
            log.info("circuit for upstream %r closed", self.name)
            self._notify(False)

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or (self.state == "closed" and self.failures >= self.threshold):
            if self.state == "closed":
                log.warning("circuit for upstream %r opened after %d failures", self.name, self.failures)
                self._notify(True)
            self.state = "open"
            self._opened_at = self.clock.time()

    def abandon_probe(self) -> None:
        """The probe ended without a verdict (the client left): let the next call probe."""
        if self.state == "half_open":
            self.state = "open"
            self._opened_at = self.clock.time() - self.cooldown_s

    def _cooldown_left(self) -> float:
        return self._opened_at + self.cooldown_s - self.clock.time()

    def _notify(self, is_open: bool) -> None:
        if self._on_change is not None:
            self._on_change(is_open)


class BufferedResponse:
    """An upstream answer already read in full (inside the attempt that fetched it)."""

    __slots__ = ("_body", "content_type", "headers", "status")

    def __init__(self, response: UpstreamResponse, body: bytes):
        self.status = response.status
        self.headers = response.headers
        self.content_type = response.content_type
        self._body = body

    @property
    def is_event_stream(self) -> bool:
        return False

    async def read(self) -> bytes:
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        return None


class RetryableFailure(Exception):
    """One failed attempt that another attempt may fix: its answer or its error."""

    def __init__(self, response: UpstreamResponse | None = None, error: GatewayError | None = None):
        super().__init__(
            error.message if error else f"upstream answered {response.status if response else '?'}"
        )
        self.response = response
        self.error = error
        self.retry_after = retry_after_s(response.headers) if response is not None else None

    def give_up(self) -> UpstreamResponse:
        """What the client gets when this was the last attempt."""
        if self.response is not None:
            return self.response
        assert self.error is not None
        raise self.error


def retry_after_s(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    values = dict(h for h in headers if h[0] in (b"retry-after", b"retry-after-ms"))
    if b"retry-after-ms" in values:
        with contextlib.suppress(ValueError):
            return max(0.0, float(values[b"retry-after-ms"]) / 1000)
    text = values.get(b"retry-after", b"").decode("latin-1").strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(text).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def is_retryable_status(status: int) -> bool:
    return status == 429 or (status >= 500 and status != 501)


def is_retryable_error(error: GatewayError) -> bool:
    if isinstance(error, UpstreamTimeout):
        return error.code == CONNECT_TIMEOUT_CODE
    return isinstance(error, UpstreamUnreachable)


class ResilientUpstream:
    """An Upstream with retries and a circuit breaker; the same protocol outward."""

    def __init__(
        self,
        inner: Upstream,
        retry: RetrySettings,
        breaker: CircuitBreaker,
        on_retry: Callable[[], None] | None = None,
    ):
        self.inner = inner
        self.name = inner.name
        self.api_key = inner.api_key
        self.retry = retry
        self.breaker = breaker
        self._on_retry = on_retry
        self._backoff = wait_random_exponential(multiplier=retry.backoff_initial_s, max=retry.backoff_max_s)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "circuit": self.breaker.state}

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        # The first attempt runs without tenacity (~35 µs a call): most calls need no retry.
        try:
            return await self._attempt(request)
        except RetryableFailure as failure:
            first = failure
        if self._should_stop_after(first, attempt=1):
            return first.give_up()
        return await self._retry(request, first)

    async def _retry(self, request: UpstreamRequest, first: RetryableFailure) -> UpstreamResponse:
        replay: list[RetryableFailure] = [first]

        async def attempt() -> UpstreamResponse:
            if replay:  # attempt 1 already ran on the fast path: replay its outcome
                raise replay.pop()
            return await self._attempt(request)

        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception_type(RetryableFailure),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            return await retrying(attempt)
        except RetryableFailure as failure:
            return failure.give_up()

    async def _attempt(self, request: UpstreamRequest) -> UpstreamResponse:
        is_probe = self.breaker.before_call()
        try:
            return await self._call(request)
        except BaseException:
            if is_probe:  # no-op when the attempt reached a verdict; else let another probe
                self.breaker.abandon_probe()
            raise

    async def _call(self, request: UpstreamRequest) -> UpstreamResponse:
        """One attempt, its verdict told to the breaker; RetryableFailure for what another
        attempt may fix."""
        try:
            response = await self.inner.send(request)
            if response.is_event_stream and not is_retryable_status(response.status):
                self.breaker.record_success()
                return response
            body = await response.read()
        except (UpstreamUnreachable, UpstreamTimeout) as error:
            self.breaker.record_failure()
            if is_retryable_error(error):
                raise RetryableFailure(error=error) from None
            raise
        except GatewayError:
            self.breaker.record_success()  # the upstream answered (e.g. a translated 4xx)
            raise
        buffered = BufferedResponse(response, body)
        if response.status >= 500:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        if is_retryable_status(response.status):
            raise RetryableFailure(response=buffered)
        return buffered

    def _stop(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        failure = outcome.exception() if outcome is not None else None
        if not isinstance(failure, RetryableFailure):
            return True
        return self._should_stop_after(failure, state.attempt_number)

    def _should_stop_after(self, failure: RetryableFailure, attempt: int) -> bool:
        if attempt >= self.retry.attempts or self.breaker.is_open:
            return True
        return failure.retry_after is not None and failure.retry_after > self.retry.retry_after_cap_s

    def _wait(self, state: RetryCallState) -> float:
        backoff = float(self._backoff(state))
        outcome = state.outcome
        failure = outcome.exception() if outcome is not None else None
        if isinstance(failure, RetryableFailure) and failure.retry_after is not None:
            return max(failure.retry_after, backoff)
        return backoff

    def _count_retry(self, state: RetryCallState) -> None:
        if self._on_retry is not None:
            self._on_retry()


def make_resilient(
    inner: Upstream, settings: UpstreamSettings, metrics: Metrics, clock: Clock | None = None
) -> ResilientUpstream:
    """Wrap an upstream with its configured retries and breaker, reporting to the metrics."""
    gauge = metrics.circuit_open.labels(inner.name)
    gauge.set(0)
    breaker = CircuitBreaker(
        inner.name, settings.breaker, clock, on_change=lambda is_open: gauge.set(int(is_open))
    )
    return ResilientUpstream(inner, settings.retry, breaker, on_retry=metrics.upstream_retries.inc)
