"""Requests a web page made a browser send: refused, so no site a user visits can spend the
upstream's credits, poison the logs or flip a route through a gateway on their machine.

Browsers say where a request comes from: `Sec-Fetch-Site` (`same-origin`, `same-site`,
`cross-site`, or `none` for one the user typed), and `Origin` on every POST. Only same-origin
(the dashboard) and user-initiated requests pass; without Sec-Fetch-Site (older browsers), an
Origin other than the host the request was sent to is refused. Clients that are not browsers
(SDKs, curl) send neither header and are not affected. The gateway answers no CORS preflight,
so no page elsewhere could have used it legitimately anyway.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gateway.errors import Forbidden

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def refuse_cross_origin(scope: dict[str, Any]) -> None:
    """Raise Forbidden for a state-changing request whose Origin is not this gateway."""
    if scope["method"] in _SAFE_METHODS:
        return
    origin = host = site = None
    for name, value in scope["headers"]:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
        elif name == b"sec-fetch-site":
            site = value.decode("latin-1")
    if site is not None:
        # A same-origin form post may say `Origin: null` (no-referrer pages): trust this one.
        cross = site not in ("same-origin", "none")
    else:
        cross = origin is not None and (host is None or urlsplit(origin).netloc.lower() != host.lower())
    if cross:
        raise Forbidden(
            "cross-origin browser requests are refused: the request's Origin is not this gateway",
            code="cross_origin",
        )
