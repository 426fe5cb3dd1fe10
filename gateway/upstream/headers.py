"""Which of a client's request headers go upstream.

Two modes (the README has the table):
- transparent (no client keys): the client's headers as sent, minus hop-by-hop ones (RFC 9110
  7.6.1), those its `Connection` header names, and gateway control headers (`X-Understudy-*`);
  a configured upstream key replaces the client's credentials.
- keyed (`auth.keys`: clients present gateway keys and share the operator's upstream key):
  only `KEYED_HEADERS`, which shape the request and its answer but never say whom it is for
  or where it came from: no `OpenAI-Organization`/`OpenAI-Project` (a tenant would point the
  shared key at another org or project), no cookies, no forwarding headers.
"""

from __future__ import annotations

from gateway.upstream.base import HOP_BY_HOP

KEYED_HEADERS = frozenset(
    {
        "accept",
        "accept-language",
        "content-type",
        "user-agent",
        "openai-beta",
        "idempotency-key",
    }
)
# The openai SDKs' own telemetry and retry bookkeeping (x-stainless-lang, -retry-count, ...).
KEYED_PREFIXES = ("x-stainless-",)
_CREDENTIALS = frozenset({"authorization", "api-key", "x-api-key"})


def _header_text(raw: bytes) -> str:
    """A header value as text that aiohttp, which writes headers as UTF-8, sends back as the
    same bytes (any UTF-8 or ASCII value); other bytes go as their Latin-1 reading."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _connection_named(headers: list[tuple[bytes, bytes]]) -> frozenset[str]:
    """The header names the request's Connection header(s) list: hop-by-hop by declaration."""
    named: set[str] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.decode("latin-1").split(","))
    return frozenset(named)


def _passes(name: str, keyed: bool, api_key: str | None) -> bool:
    if keyed:
        return name in KEYED_HEADERS or name.startswith(KEYED_PREFIXES)
    if name in HOP_BY_HOP or name.startswith("x-understudy-"):
        return False
    return not (api_key and name in _CREDENTIALS)


def forward_headers(
    headers: list[tuple[bytes, bytes]], api_key: str | None, keyed: bool = False
) -> dict[str, str]:
    """The client's headers as they go upstream (see the module's docstring for the modes).
    `keyed`: clients authenticate with gateway keys, which are never forwarded. With
    `api_key`, it is the upstream's `Authorization`, whatever the client sent."""
    named = _connection_named(headers)
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name not in named and _passes(name, keyed, api_key):
            out[name] = _header_text(raw_value)
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out
