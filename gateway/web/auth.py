"""Admin authentication: Bearer UNDERSTUDY_ADMIN_KEY, compared in constant time. Without a
configured key only loopback clients are let in (a fresh local install just works).

Browsers get a session cookie instead of the key (set by the dashboard's login): it holds an
expiry and an HMAC of it under the admin key, so it is useless without the key, dies with
its expiry, and every session ends when the key changes. It is HttpOnly and SameSite=Strict,
so page scripts cannot read it and other sites cannot make a browser send it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from urllib.parse import urlsplit

from starlette.requests import Request

from gateway.errors import Forbidden, Unauthorized

SESSION_COOKIE = "understudy_admin"
SESSION_TTL_S = 7 * 24 * 3600


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_matches(candidate: str, admin_key: str) -> bool:
    return hmac.compare_digest(candidate.encode(), admin_key.encode())


def _signature(admin_key: str, expires: int) -> str:
    message = f"understudy-ui-session:{expires}".encode()
    return hmac.new(admin_key.encode(), message, hashlib.sha256).hexdigest()


def session_token(admin_key: str, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + SESSION_TTL_S)
    return f"{expires}.{_signature(admin_key, expires)}"


def session_valid(token: str, admin_key: str, now: float | None = None) -> bool:
    expires, _, signature = token.partition(".")
    if not (expires.isascii() and expires.isdigit() and len(expires) < 16):
        return False
    fresh = int(expires) > (time.time() if now is None else now)
    return hmac.compare_digest(signature.encode(), _signature(admin_key, int(expires)).encode()) and fresh


def _has_credentials(request: Request, admin_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key_matches(token.strip(), admin_key):
        return True
    cookie = request.cookies.get(SESSION_COOKIE)
    return cookie is not None and session_valid(cookie, admin_key)


def _cross_site(request: Request) -> bool:
    """A browser sending this request on behalf of another site's page."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


def require_admin(request: Request, admin_key: str | None) -> None:
    """Return if the request may use the admin API; raise Unauthorized/Forbidden otherwise.

    Changes (anything but GET/HEAD) sent by a browser for another site are refused first: a
    loopback client without a key, or a signed-in browser, must not be a confused deputy."""
    if request.method not in ("GET", "HEAD") and _cross_site(request):
        raise Forbidden("cross-site admin requests are refused")
    if admin_key is None:
        if not is_loopback(request.client.host if request.client else None):
            raise Forbidden("admin endpoints are open to loopback only until UNDERSTUDY_ADMIN_KEY is set")
        return
    if not _has_credentials(request, admin_key):
        raise Unauthorized("a valid admin key is required (Authorization: Bearer <UNDERSTUDY_ADMIN_KEY>)")
