"""Admin authentication: Bearer UNDERSTUDY_ADMIN_KEY, compared in constant time. Without a
configured key only loopback clients are let in (a fresh local install just works)."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request

from gateway.errors import Forbidden, Unauthorized


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_admin(request: Request, admin_key: str | None) -> None:
    if admin_key is None:
        if not is_loopback(request.client.host if request.client else None):
            raise Forbidden("admin endpoints are open to loopback only until UNDERSTUDY_ADMIN_KEY is set")
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key.encode()):
        raise Unauthorized("a valid admin key is required (Authorization: Bearer <UNDERSTUDY_ADMIN_KEY>)")
