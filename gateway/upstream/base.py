"""The upstream seam: a request going out and the response coming back, streamed or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.domain.view import RequestView

# Never forwarded in either direction: hop-by-hop headers (RFC 9110 7.6.1) and those the
# gateway recomputes (length, encoding, host).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "expect",
        "date",
        "server",
    }
)


def client_facing_headers(items: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers as the client should see them: hop-by-hop dropped, the
    upstream's request id renamed (X-Request-Id is the gateway's), no spoofed gateway headers."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in items:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered.startswith("x-understudy-"):
            continue
        if lowered == "x-request-id":
            lowered = "x-upstream-request-id"
        # aiohttp decoded the bytes as UTF-8 with surrogateescape: this gives them back as sent.
        out.append((lowered.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")))
    return out


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    # Path below the upstream's base URL, e.g. "/chat/completions" for "/v1/chat/completions".
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    view: RequestView = field(default_factory=lambda: RequestView(body=None))


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]
    content_type: str

    @property
    def is_event_stream(self) -> bool: ...

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    name: str
    api_key: str | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send and return once the status and headers are in. Raises UpstreamUnreachable or
        UpstreamTimeout; an upstream error status is a response, not an exception."""
        ...

    def describe(self) -> dict[str, Any]: ...
