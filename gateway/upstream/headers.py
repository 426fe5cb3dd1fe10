"""Which of a client's request headers go upstream."""

from __future__ import annotations

from gateway.upstream.base import HOP_BY_HOP


def _header_text(raw: bytes) -> str:
    """A header value as text that aiohttp, which writes headers as UTF-8, sends back as the
    same bytes (any UTF-8 or ASCII value); other bytes go as their Latin-1 reading."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def forward_headers(
    headers: list[tuple[bytes, bytes]], api_key: str | None, drop_client_key: bool = False
) -> dict[str, str]:
    """The client's headers minus hop-by-hop and gateway control headers; the configured
    upstream key replaces the client's Authorization when there is one. A gateway client
    key (`drop_client_key`) is never forwarded."""
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name in HOP_BY_HOP or name.startswith("x-understudy-"):
            continue
        if (api_key or drop_client_key) and name in ("authorization", "api-key", "x-api-key"):
            continue
        out[name] = _header_text(raw_value)
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out
