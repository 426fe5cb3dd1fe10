"""Admin authentication: Bearer UNDERSTUDY_ADMIN_KEY, compared in constant time. Without a
configured key only loopback clients are let in (a fresh local install just works), and only
when their request names this gateway in its Host (see `gateway.origin`): a page that rebinds
its own domain to 127.0.0.1 is a loopback client too.

Browsers get a session cookie instead of the key (set by the dashboard's sign-in form; see
`Sessions`). It is HttpOnly and SameSite=Strict, so page scripts cannot read it and other
sites cannot make a browser send it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

from gateway.errors import Forbidden, Unauthorized
from gateway.origin import ALLOWED_HOSTS, AllowedHosts

log = logging.getLogger(__name__)
SESSION_COOKIE = "understudy_admin"
# Sign-outs remembered at most (each is forgotten once its session would have expired).
MAX_REVOKED = 10_000


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_matches(candidate: str, admin_key: str) -> bool:
    return hmac.compare_digest(candidate.encode(), admin_key.encode())


class Sessions:
    """Dashboard sign-ins. A cookie is `ID.EXPIRES.MAC`: a random id per sign-in (no two
    share a cookie), its expiry, and an HMAC of both under the admin key (useless without the
    key; every session ends when the key changes). Signing out writes the id to a revocation
    list, kept in `path` until the session would have expired anyway, so a copied cookie dies
    with the sign-out, across restarts too. Replicas share sign-outs only if they share `path`.
    """

    def __init__(self, ttl_s: float, path: Path | None = None, clock: Callable[[], float] = time.time):
        self.ttl_s = ttl_s
        self.path = path
        self.clock = clock
        self._revoked: dict[str, float] | None = None
        self._issued_after = 0.0
        self._lock = threading.Lock()

    def issue(self, admin_key: str) -> str:
        session_id = secrets.token_urlsafe(18)
        expires = int(self.clock() + self.ttl_s)
        return f"{session_id}.{expires}.{_mac(admin_key, session_id, expires)}"

    def valid(self, token: str, admin_key: str) -> bool:
        parsed = _parse(token, admin_key)
        if parsed is None or parsed[1] <= self.clock():
            return False
        revoked = self._known_revoked()
        return parsed[0] not in revoked and parsed[1] - self.ttl_s >= self._issued_after

    def revoke(self, token: str, admin_key: str) -> None:
        """End the session `token` names, if it is one (blocking: writes the list to disk)."""
        parsed = _parse(token, admin_key)
        if parsed is None:
            return
        with self._lock:
            now = self.clock()
            kept = {sid: exp for sid, exp in self._known_revoked().items() if exp > now}
            kept[parsed[0]] = parsed[1]
            self._revoked = dict(sorted(kept.items(), key=lambda item: item[1])[-MAX_REVOKED:])
            try:
                self._save(self._revoked)
            except OSError as exc:
                log.warning("sign-out kept in memory only: cannot write %s: %s", self.path, exc.strerror)

    def _known_revoked(self) -> dict[str, float]:
        if self._revoked is None:
            self._revoked = self._load()
        return self._revoked

    def _load(self) -> dict[str, float]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(sid): float(exp) for sid, exp in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError):
            # Sign-outs lost: refuse every session issued until now (sign in again).
            log.warning("cannot read %s: every dashboard session ends now", self.path)
            self._issued_after = float(int(self.clock()))
            return {}

    def _save(self, revoked: dict[str, float]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".sessions-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(revoked, out)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


def _mac(admin_key: str, session_id: str, expires: int) -> str:
    message = f"understudy-ui-session:{session_id}:{expires}".encode()
    return hmac.new(admin_key.encode(), message, hashlib.sha256).hexdigest()


def _parse(token: str, admin_key: str) -> tuple[str, int] | None:
    """(session id, expiry) of a well-formed token signed with `admin_key`, else None."""
    session_id, _, rest = token.partition(".")
    expires, _, mac = rest.partition(".")
    if not (session_id and expires.isascii() and expires.isdigit() and len(expires) < 16):
        return None
    if not hmac.compare_digest(mac.encode(), _mac(admin_key, session_id, int(expires)).encode()):
        return None
    return session_id, int(expires)


def sessions_of(request: Request) -> Sessions | None:
    app = request.scope.get("app")
    sessions = getattr(getattr(app, "state", None), "sessions", None)
    return sessions if isinstance(sessions, Sessions) else None


def _has_credentials(request: Request, admin_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key_matches(token.strip(), admin_key):
        return True
    cookie = request.cookies.get(SESSION_COOKIE)
    sessions = sessions_of(request)
    return cookie is not None and sessions is not None and sessions.valid(cookie, admin_key)


def _cross_site(request: Request) -> bool:
    """A browser sending this request on behalf of another site's page."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


def _names_this_gateway(request: Request) -> bool:
    """The request has a Host, and it is one of this gateway's names (when the app said which)."""
    host = request.headers.get("host")
    allowed: AllowedHosts | None = request.scope.get(ALLOWED_HOSTS)
    return host is not None and (allowed is None or allowed.allows(host.encode("latin-1")))


def require_admin(request: Request, admin_key: str | None) -> None:
    """Return if the request may use the admin API; raise Unauthorized/Forbidden otherwise.

    Changes (anything but GET/HEAD) sent by a browser for another site are refused first: a
    loopback client without a key, or a signed-in browser, must not be a confused deputy."""
    if request.method not in ("GET", "HEAD") and _cross_site(request):
        raise Forbidden("cross-site admin requests are refused")
    if admin_key is None:
        loopback = is_loopback(request.client.host if request.client else None)
        if not (loopback and _names_this_gateway(request)):
            raise Forbidden("admin endpoints are open to loopback only until UNDERSTUDY_ADMIN_KEY is set")
        return
    if not _has_credentials(request, admin_key):
        raise Unauthorized("a valid admin key is required (Authorization: Bearer <UNDERSTUDY_ADMIN_KEY>)")
