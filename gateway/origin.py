"""Requests a web page made a browser send: refused, so no site a user visits can spend the
upstream's credits, read the logs or flip a route through a gateway on their machine.

Two checks, on every request (`/v1`, `/admin`, `/ui` alike):

- **Host (DNS rebinding).** A page whose domain its owner re-points at 127.0.0.1 is, to the
  browser, same-origin with the gateway: `Origin` and `Host` both carry the attacker's name.
  So `Host` must be one of the gateway's own names: an IP address (an address cannot be
  rebound), `localhost` or `*.localhost` (browsers resolve those themselves), or a name in
  `server_names`. The port is not compared: rebinding changes the name, never the port, and
  a container's port mapping changes the port legitimately. A request without Host passes
  here (HTTP/1.0 clients) but never counts as loopback for the admin API (`web.auth`).
- **Origin (cross-site requests).** Browsers say where a request comes from:
  `Sec-Fetch-Site` (`same-origin`, `same-site`, `cross-site`, or `none` for one the user
  typed), and `Origin` on every POST. For a state-changing request only same-origin (the
  dashboard) and user-initiated ones pass; without Sec-Fetch-Site (older browsers), an Origin
  other than the host the request was sent to is refused. Clients that are not browsers
  (SDKs, curl) send neither header and are not affected. The gateway answers no CORS
  preflight, so no page elsewhere could have used it legitimately anyway.

The app puts the allowed names in the request's scope (`ALLOWED_HOSTS`), so the proxy's own
call to `refuse_cross_origin` (inside its logged path) applies them too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import Forbidden, InvalidRequest

ALLOWED_HOSTS = "understudy.allowed_hosts"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REMEMBERED = 256


def host_name(raw: bytes) -> str | None:
    """The name in a Host value, lowercased, without port or trailing dot; None if malformed."""
    text = raw.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        name, _, port = text.partition(":")
        if ":" in port:
            return None
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    name = name.removesuffix(".")
    return name or None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AllowedHosts:
    """The Host names this gateway answers to: IP addresses, localhost, and `server_names`
    (exact names, or `*.suffix` for any name under it)."""

    def __init__(self, server_names: Iterable[str] = ()):
        names = [name.lower() for name in server_names]
        self._exact = frozenset(name for name in names if not name.startswith("*."))
        self._suffixes = tuple(name[1:] for name in names if name.startswith("*."))
        # Host values already allowed, as they came: the hot path skips the parsing.
        self._known: set[bytes] = set()

    def allows(self, raw: bytes) -> bool:
        if raw in self._known:
            return True
        name = host_name(raw)
        allowed = name is not None and self._allows_name(name)
        if allowed and len(self._known) < _REMEMBERED:
            self._known.add(raw)
        return allowed

    def _allows_name(self, name: str) -> bool:
        return (
            name == "localhost"
            or name.endswith(".localhost")
            or name in self._exact
            or name.endswith(self._suffixes)
            or _is_address(name)
        )


def refuse_cross_origin(scope: dict[str, Any]) -> None:
    """Raise Forbidden for a Host that is not this gateway's (when the app named its hosts in
    the scope), or a state-changing request whose Origin is not this gateway."""
    origin = host = site = None
    hosts_seen = 0
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            hosts_seen += 1
        elif name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"sec-fetch-site":
            site = value.decode("latin-1")
    allowed: AllowedHosts | None = scope.get(ALLOWED_HOSTS)
    if allowed is not None and host is not None:
        _check_host(allowed, host, hosts_seen)
    if scope["method"] in _SAFE_METHODS:
        return
    if site is not None:
        # A same-origin form post may say `Origin: null` (no-referrer pages): trust this one.
        cross = site not in ("same-origin", "none")
    else:
        cross = origin is not None and (
            host is None or urlsplit(origin).netloc.lower() != host.decode("latin-1").lower()
        )
    if cross:
        raise Forbidden(
            "cross-origin browser requests are refused: the request's Origin is not this gateway",
            code="cross_origin",
        )


def _check_host(allowed: AllowedHosts, host: bytes, hosts_seen: int) -> None:
    if hosts_seen > 1:
        raise InvalidRequest("the request has more than one Host header", code="invalid_host")
    if not allowed.allows(host):
        raise Forbidden(
            "the Host header is not one of this gateway's names: use its IP address or localhost, "
            "or add the name to server_names in gateway.yaml",
            code="host_not_allowed",
        )
