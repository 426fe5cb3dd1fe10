"""A pooled HTTP/1.1 client on httptools (llhttp) and the event loop's own transports.

The hot path's client for OpenAI-compatible upstreams: bytes go out as the client sent them
and come back as the upstream sent them. It keeps what aiohttp's client did for the gateway,
for less CPU per call (`bench/proxy_alternatives.py` measures both):

- keep-alive connections, at most `max_connections` open (more calls wait for one), idle
  ones closed after 30 s, one the server closed noticed and replaced by a new one; a call
  whose connection closes before its answer is a 502, never sent again here (the server may
  have acted on it: whether to retry is `resilience.py`'s call, as with aiohttp);
- timeouts: connect, idle read (silence between two bytes, the first included, not counted
  while the consumer is behind), total (the call, its answer's last byte included);
- content-length, chunked and close-delimited answers; gzip and deflate are asked for and
  decoded (as aiohttp did), so bodies reach the gateway as plain bytes;
- https through the event loop's TLS (the system's CAs, or the context given);
- no proxies (aiohttp's client was not told to use any either);
- errors as the gateway's own (502/504), naming the upstream, never its address.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import quote, urlsplit

import httptools

from gateway.errors import (
    BadUpstreamResponse,
    GatewayError,
    InvalidRequest,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.settings import UpstreamSettings
from gateway.upstream.base import HOP_BY_HOP

CONNECT_TIMEOUT_CODE: Final = "upstream_connect_timeout"
IDLE_KEEPALIVE_S: Final = 30.0
_HOP_BY_HOP: Final = frozenset(name.encode() for name in HOP_BY_HOP)
# Buffered answer bytes the consumer has not taken yet, above which the socket is not read.
HIGH_WATER: Final = 1 << 20
_BODILESS_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
_SAFE_URL: Final = "!#$%&'()*+,/:;=?@[]~"


class Http1Response:
    """One answer: status and headers at once, the body as it comes."""

    __slots__ = (
        "_chunks",
        "_close_delimited",
        "_conn",
        "_decoder",
        "_done",
        "_error",
        "_limit",
        "_raw_headers",
        "_upstream",
        "_waiter",
        "buffered",
        "content_length",
        "content_type",
        "deadline",
        "head_only",
        "headers",
        "last_data",
        "status",
    )

    def __init__(self, upstream: str, limit: int, deadline: float, now: float, head_only: bool = False):
        self._upstream = upstream
        self.head_only = head_only  # an answer to HEAD: headers, never a body
        self._limit = limit
        self._conn: _Connection | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._decoder: Any = None
        self._done = False
        self._close_delimited = False
        self.buffered = 0
        self.deadline = deadline
        self.last_data = now
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = ""
        self.content_length: int | None = None

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    # --- the consumer's side -------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def wait_headers(self) -> None:
        while not self.status and self._error is None:
            await self._wait()
        if not self.status:
            assert self._error is not None
            raise self._error

    async def read(self) -> bytes:
        """The whole body, at most `max_response_bytes` of it (else 502, connection closed)."""
        if self.content_length is not None and self.content_length > self._limit:
            self.close()
            raise self._too_large()
        while not self._done:
            if self._error is not None:
                raise self._error
            if self.buffered > self._limit:
                self.close()
                raise self._too_large()
            self._take_reading()
            try:
                await self._wait()
            except asyncio.CancelledError:  # the caller gave up: so does the connection
                self.close()
                raise
        if self.buffered > self._limit:
            raise self._too_large()
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        return body

    def _too_large(self) -> BadUpstreamResponse:
        return BadUpstreamResponse(
            f"upstream {self._upstream!r} answered more than the {self._limit}-byte limit "
            "(upstream.max_response_bytes)"
        )

    def _take_reading(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        chunks = self._chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                self.buffered -= len(chunk)
                yield chunk
            elif self._done:
                return
            elif self._error is not None:
                raise self._error
            else:
                self._take_reading()
                await self._wait()

    def close(self) -> None:
        """Stop here: an answer not wholly received closes its connection."""
        conn = self._conn
        if conn is not None and not self._done:
            self._conn = None
            self._fail(
                UpstreamUnreachable(f"upstream {self._upstream!r} failed: the upstream's answer was cut off")
            )
            conn.abandon()

    # --- the connection's side -----------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = error
            self._wake()

    def _headers_complete(self, status: int) -> None:
        content_type = ""
        chunked = False
        # As the client should see them (base.client_facing_headers, here on bytes): hop-by-hop
        # ones dropped, the upstream's request id renamed, no spoofed gateway headers.
        passed = self.headers
        for name, value in self._raw_headers:
            lowered = name.lower()
            if lowered not in _HOP_BY_HOP and not lowered.startswith(b"x-understudy-"):
                passed.append((b"x-upstream-request-id" if lowered == b"x-request-id" else lowered, value))
            if lowered == b"content-type":
                content_type = value.decode("latin-1")
            elif lowered == b"content-length" and value.strip().isdigit():
                self.content_length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lowered == b"content-encoding":
                coding = value.strip().lower()
                if coding in (b"gzip", b"x-gzip"):
                    self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
                elif coding == b"deflate":
                    self._decoder = _Deflate()
        self._close_delimited = (
            self.content_length is None and not chunked and status >= 200 and status not in (204, 304)
        )
        self.content_type = content_type
        self.status = status
        self._wake()

    def _body(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error:
                self._fail(self._cut())
                return
            if not data:
                return
        self._chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def _complete(self) -> None:
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except zlib.error:
                self._fail(self._cut())
                return
            if tail:
                self._chunks.append(tail)
                self.buffered += len(tail)
        self._done = True
        self._conn = None
        self._wake()

    def _cut(self) -> UpstreamUnreachable:
        return UpstreamUnreachable(f"upstream {self._upstream!r} failed: the upstream's answer was cut off")

    def _lost(self) -> None:
        if self._done or self._error is not None:
            return
        if self.status and self._close_delimited:
            self._complete()
        elif self.status:
            self._fail(self._cut())
        else:
            self._fail(self._closed())

    def _closed(self) -> UpstreamUnreachable:
        return UpstreamUnreachable(f"upstream {self._upstream!r} failed: the upstream closed the connection")


class _Deflate:
    """`Content-Encoding: deflate` is zlib-wrapped by the standard, raw in some servers."""

    def __init__(self) -> None:
        self._inner: Any = None

    def decompress(self, data: bytes) -> bytes:
        if self._inner is None:
            raw = len(data) > 0 and (data[0] & 0x0F) != 8
            self._inner = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        return bytes(self._inner.decompress(data))

    def flush(self) -> bytes:
        return b"" if self._inner is None else bytes(self._inner.flush())


class _Connection(asyncio.Protocol):
    __slots__ = ("idle_timer", "parser", "paused", "pool", "response", "timer", "transport")

    def __init__(self, pool: Http1Client):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Http1Response | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.paused = False

    # asyncio's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing may come on an idle connection
            self.abandon()
            return
        response.last_data = self.pool.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            response._fail(
                UpstreamUnreachable(f"upstream {response._upstream!r} failed: its answer is not valid HTTP")
            )
            self.abandon()
            return
        if response.buffered > HIGH_WATER and not self.paused and self.response is response:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._forget(self)
        self._stop_timer()
        response, self.response = self.response, None
        if response is not None:
            response._lost()

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100, 103): its message ends; the real one follows
            response._raw_headers.clear()
            return
        response._headers_complete(status)
        if response.head_only:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._body(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.status:
            return
        self.response = None
        self._stop_timer()
        keep = self.parser.should_keep_alive() and not response.head_only
        response._complete()
        if keep:
            self.pool._release(self)
        else:
            self.abandon()

    # the pool's side

    def start(self, response: Http1Response, data: bytes, body: bytes) -> None:
        self.response = response
        response._conn = self
        transport = self.transport
        assert transport is not None
        if len(body) < 16384:
            transport.write(data + body)
        else:
            transport.writelines((data, body))
        self.timer = self.pool.loop.call_at(
            min(response.deadline, response.last_data + self.pool.read_timeout), self._on_timer
        )

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        response = self.response
        self.timer = None
        if response is None:
            return
        now = self.pool.loop.time()
        if self.paused:  # the consumer is behind: the upstream's silence is not its fault
            response.last_data = now
        if now >= response.deadline or now - response.last_data >= self.pool.read_timeout:
            response._fail(UpstreamTimeout(f"upstream {response._upstream!r} did not answer in time"))
            self.abandon()
            return
        self.timer = self.pool.loop.call_at(
            min(response.deadline, response.last_data + self.pool.read_timeout), self._on_timer
        )

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def abandon(self) -> None:
        """Close now; the pool forgets it at once (connection_lost comes later)."""
        self.pool._forget(self)
        self._stop_timer()
        response, self.response = self.response, None
        if response is not None:
            response._lost()
        if self.transport is not None:
            self.transport.close()


class Http1Client:
    """A keep-alive pool to one origin (scheme, host, port)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float,
        max_response_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream {name!r}: base_url must be an http:// or https:// URL")
        self.name = name
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.limit = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.max_response_bytes = max_response_bytes
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.loop: asyncio.AbstractEventLoop  # set by start()

    # --- calls ---------------------------------------------------------------------------

    def encode_head(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> bytes:
        target = self.base_path + path + ("?" + query if query else "")
        if not target.isascii():
            target = quote(target, safe=_SAFE_URL, encoding="latin-1")
        lines = [f"{method} {target or '/'} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise InvalidRequest(f"the header {name!r} contains a line break", code="invalid_header")
            lines.append(f"{name}: {value}\r\n")
        if "accept" not in headers:
            lines.append("Accept: */*\r\n")
        lines.append("Accept-Encoding: gzip, deflate\r\n")
        if body or method not in _BODILESS_METHODS:
            if body and "content-type" not in headers:
                lines.append("Content-Type: application/octet-stream\r\n")
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def request(self, method: str, head: bytes, body: bytes) -> Http1Response:
        """Send, and return once the status and headers are in."""
        loop = self.loop
        now = loop.time()
        deadline = now + self.total_timeout
        conn = await self._acquire(deadline)
        response = Http1Response(self.name, self.max_response_bytes, deadline, loop.time(), method == "HEAD")
        conn.start(response, head, body)
        try:
            await response.wait_headers()
        except BaseException:
            response.close()
            raise
        return response

    # --- the pool ------------------------------------------------------------------------

    async def _acquire(self, deadline: float) -> _Connection:
        idle = self._idle
        while True:
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be closed
                if conn.idle_timer is not None:
                    conn.idle_timer.cancel()
                    conn.idle_timer = None
                if conn.transport is not None and not conn.transport.is_closing():
                    return conn
                conn.abandon()
            if len(self._open) + self._connecting < self.limit:
                return await self._connect()
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            # Nothing was sent yet: safe to retry (resilience.py), unlike a read timeout.
            raise UpstreamTimeout(
                f"upstream {self.name!r}: connect timed out", code=CONNECT_TIMEOUT_CODE
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamUnreachable(
                f"upstream {self.name!r} failed: TLS failed ({exc.reason or 'handshake'})"
            ) from None
        except OSError as exc:
            # Not the OS error's own text: it names the upstream's address.
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise UpstreamUnreachable(f"upstream {self.name!r} failed: cannot connect ({reason})") from None
        finally:
            self._connecting -= 1
            self._wake_one()
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.transport is None or conn.transport.is_closing():
            conn.abandon()
            return
        if conn.paused:
            conn.resume()
        self._idle.append(conn)
        conn.idle_timer = self.loop.call_at(self.loop.time() + IDLE_KEEPALIVE_S, conn.abandon)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for conn in list(self._open):
            conn.abandon()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing

    @property
    def open_connections(self) -> int:
        return len(self._open)


class Http1Upstream:
    """An OpenAI-compatible upstream over `Http1Client` (the default for `provider: openai`)."""

    def __init__(self, name: str, settings: UpstreamSettings, ssl_context: ssl.SSLContext | None = None):
        self.name = name
        self.settings = settings
        self.api_key = settings.api_key
        self.base_url = settings.base_url.rstrip("/")
        self.client = Http1Client(
            name,
            self.base_url,
            max_connections=settings.max_connections,
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            total_timeout=settings.timeout_s,
            max_response_bytes=settings.max_response_bytes,
            ssl_context=ssl_context,
        )
        self._started = False

    async def start(self) -> None:
        self.client.start()
        self._started = True

    async def close(self) -> None:
        if self._started:
            await self.client.close()
            self._started = False

    async def send(self, request: Any) -> Http1Response:
        assert self._started, "upstream not started"
        client = self.client
        head = client.encode_head(request.method, request.path, request.query, request.headers, request.body)
        try:
            return await client.request(request.method, head, request.body)
        except GatewayError:
            raise
        except OSError as exc:  # a write on a socket that just failed
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise UpstreamUnreachable(f"upstream {self.name!r} failed: {reason}") from None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "provider": "openai", "base_url": self.base_url}
