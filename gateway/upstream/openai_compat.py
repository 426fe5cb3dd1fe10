"""Any OpenAI-compatible API over one pooled aiohttp session: the hot path.

Bytes go out as the client sent them and come back as the upstream sent them; only headers
are filtered. Timeouts: connect, idle read (between two chunks, first byte included), total.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gateway.errors import BadUpstreamResponse, GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.settings import UpstreamSettings
from gateway.upstream.base import UpstreamRequest, client_facing_headers

CONNECT_TIMEOUT_CODE = "upstream_connect_timeout"


def translate_error(exc: BaseException, upstream: str) -> GatewayError:
    """Map a client-side failure to the gateway's error (never leaking the URL's secrets)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # Nothing was sent yet: safe to retry (resilience.py), unlike a read timeout.
        return UpstreamTimeout(f"upstream {upstream!r}: connect timed out", code=CONNECT_TIMEOUT_CODE)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"upstream {upstream!r} did not answer in time")
    reason = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Not the OS error's own text: it names the upstream's address, not the client's business.
        errno_ = exc.os_error.errno
        reason = f"cannot connect ({os.strerror(errno_) if errno_ else type(exc.os_error).__name__})"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        reason = "the upstream closed the connection"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        reason = "the upstream's answer was cut off"
    return UpstreamUnreachable(f"upstream {upstream!r} failed: {reason}")


class AiohttpResponse:
    __slots__ = ("_limit", "_response", "_upstream", "content_type", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, upstream: str, limit: int):
        self._response = response
        self._upstream = upstream
        self._limit = limit
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "")
        self.headers = client_facing_headers(list(response.headers.items()))

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    async def read(self) -> bytes:
        """The whole body, at most `max_response_bytes` of it (else 502, connection closed)."""
        declared = self._response.content_length
        if declared is not None and declared > self._limit:
            self.close()
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > self._limit:
                    self.close()
                    raise self._too_large()
                chunks.append(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise translate_error(exc, self._upstream) from None
        finally:
            self._response.release()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self) -> BadUpstreamResponse:
        return BadUpstreamResponse(
            f"upstream {self._upstream!r} answered more than the {self._limit}-byte limit "
            "(upstream.max_response_bytes)"
        )

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise translate_error(exc, self._upstream) from None

    def close(self) -> None:
        self._response.close()


class OpenAICompatUpstream:
    def __init__(self, name: str, settings: UpstreamSettings):
        self.name = name
        self.settings = settings
        self.api_key = settings.api_key
        self.base_url = settings.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        # auto_decompress stays on and Accept-Encoding is never forwarded: bodies arrive as
        # plain bytes the gateway can log, and Content-Encoding is never passed back.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: UpstreamRequest) -> AiohttpResponse:
        assert self._session is not None, "upstream not started"
        url = self.base_url + request.path + (f"?{request.query}" if request.query else "")
        try:
            response = await self._session.request(
                request.method, url, data=request.body or None, headers=request.headers, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise translate_error(exc, self.name) from None
        return AiohttpResponse(response, self.name, self.settings.max_response_bytes)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "provider": "openai", "base_url": self.base_url}
