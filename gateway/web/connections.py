"""The connection guard: what uvicorn leaves unbounded about a client's socket.

uvicorn (httptools or h11) waits as long as a client likes for a request's head and body, and
counts a connection against `limit_concurrency` only once its head is in (and then answers
503 to everyone, slow sockets included). So a few hundred sockets that send a header a byte
at a time hold every file descriptor and nobody else gets in: 260 of them under
`ulimit -n 256` took `/healthz` down (issue 19). `guarded_protocol` wraps the HTTP protocol
class uvicorn would pick:

- a request's head must arrive whole within `header_timeout_s` of its first byte (for a new
  connection: of its opening), else 408 (or a plain close when nothing came at all);
- its body within `body_timeout_s` of the head, else the connection closes (the app sees a
  disconnect, and the proxy logs it);
- a head larger than `max_header_bytes`: 431 and close (httptools has no cap of its own);
- an idle keep-alive connection closes after uvicorn's `timeout_keep_alive`;
- at most `max_connections` are open: one past the cap closes the connection that has waited
  longest with no request in flight (a slow head, an idle keep-alive), so slow sockets delay
  nobody for long; only when every connection has a request in flight does the newcomer get a
  503 (`too_many_connections`, Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError, InvalidRequest, Overloaded

log = logging.getLogger(__name__)
# Descriptors kept for everything but client connections: the store, the event loop, the
# listening socket, log files, the local backend's pipes.
FD_RESERVE = 64
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
_WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_connections: int


@dataclass
class ConnectionStats:
    evicted: int = 0
    refused: int = 0
    head_timeouts: int = 0
    body_timeouts: int = 0
    heads_too_large: int = 0


@dataclass
class ConnectionBook:
    """Every open client connection, and those without a request in flight, oldest first."""

    limits: ConnectionLimits
    stats: ConnectionStats = field(default_factory=ConnectionStats)
    open: set[Any] = field(default_factory=set)
    waiting: dict[Any, None] = field(default_factory=dict)
    _warned_at: float = -_WARN_EVERY_S

    def opened(self, connection: Any) -> Any | None:
        """Count a new connection; past the cap, the connection to close for it: the one
        waiting longest, or the newcomer itself when every other one is busy."""
        self.open.add(connection)
        self.waiting[connection] = None
        if len(self.open) <= self.limits.max_connections:
            return None
        victim = next((other for other in self.waiting if other is not connection), connection)
        if victim is connection:
            self.stats.refused += 1
        else:
            self.stats.evicted += 1
        self.closed(victim)
        self._warn()
        return victim

    def busy(self, connection: Any) -> None:
        self.waiting.pop(connection, None)

    def idle(self, connection: Any) -> None:
        if connection in self.open:
            self.waiting.pop(connection, None)
            self.waiting[connection] = None  # to the end: it has waited least

    def closed(self, connection: Any) -> None:
        self.open.discard(connection)
        self.waiting.pop(connection, None)

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "%d client connections open (server.max_connections): so far %d idle ones closed "
                "to make room, %d newcomers refused with 503",
                len(self.open),
                self.stats.evicted,
                self.stats.refused,
            )


def raw_error(status: int, exc: GatewayError) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, OpenAI-shaped."""
    body = exc.body_bytes()
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
    head += [name + b": " + value for name, value in exc.headers()]
    head += [b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_TOO_MANY = raw_error(
    503,
    Overloaded(
        "the gateway has as many connections open as it takes (server.max_connections)",
        code="too_many_connections",
        retry_after=1,
    ),
)
_HEAD_TIMEOUT = raw_error(
    408, InvalidRequest("the request's headers took too long to arrive", code="request_timeout")
)
_HEAD_TOO_LARGE = raw_error(
    431, InvalidRequest("the request's headers are too large", code="request_header_too_large")
)


def guarded_protocol(
    book: ConnectionBook, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`base`, default: the one `http="auto"` picks), with the
    timeouts and the connection cap of `book` (see the module docstring)."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    limits = book.limits

    class GuardedHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _tail = b""

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            victim = book.opened(self)
            if victim is self:
                self._close_with(_TOO_MANY)
                return
            if victim is not None:
                victim.transport.close()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def data_received(self, data: bytes) -> None:
            if not self._in_flight():
                if self._head_timer is None:  # a new request on a kept-alive connection
                    self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)
                if self._count_head(data) > limits.max_header_bytes:
                    book.stats.heads_too_large += 1
                    self._close_with(_HEAD_TOO_LARGE)
                    return
            super().data_received(data)
            if not self.transport.is_closing():
                self._after_read()

        def _count_head(self, data: bytes) -> int:
            """The head's bytes so far: up to its blank line, if `data` holds it."""
            end = (self._tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = data[-3:]
            return self._head_bytes

        def _after_read(self) -> None:
            if not self._in_flight():
                return
            self._head_bytes, self._tail = 0, b""
            self._stop_head_timer()
            book.busy(self)
            if not self.cycle.more_body:
                self._stop_body_timer()
            elif self._body_timer is None:
                self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_timed_out)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._stop_body_timer()
            if not self.transport.is_closing() and not self._in_flight():
                book.idle(self)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            self._stop_body_timer()
            book.closed(self)
            super().connection_lost(exc)

        def _in_flight(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_flight() or self.transport.is_closing():
                return
            book.stats.head_timeouts += 1
            if self._head_bytes:
                self._close_with(_HEAD_TIMEOUT)
            else:
                self.transport.close()

        def _body_timed_out(self) -> None:
            self._body_timer = None
            if self._in_flight() and self.cycle.more_body and not self.transport.is_closing():
                book.stats.body_timeouts += 1
                self.transport.close()

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _stop_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _close_with(self, response: bytes) -> None:
            self.transport.write(response)
            self.transport.close()

    return GuardedHTTPProtocol


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as Go does at start:
    systemd's default soft limit is 1,024); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections(fd_limit: int) -> int:
    """Half of what the reserve leaves: a proxied request holds a client and an upstream socket."""
    return max(16, (fd_limit - FD_RESERVE) // 2)
