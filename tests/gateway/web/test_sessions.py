"""Dashboard sessions (issue 19): a random id per sign-in, revoked on the server at sign-out
(across restarts), a shorter lifetime, `ui.secure_cookies`, and sign-in by the form only."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import load_settings
from gateway.web.auth import SESSION_COOKIE, Sessions
from tests.conftest import GatewayFactory, start_gateway
from tests.reliability import raw_http

ADMIN_KEY = "admin-key-for-sessions"
FORM = ("Content-Type", "application/x-www-form-urlencoded")


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_each_sign_in_is_its_own_session(tmp_path: Path) -> None:
    clock = Clock()
    sessions = Sessions(3600, tmp_path / "revoked.json", clock)
    first, second = sessions.issue(ADMIN_KEY), sessions.issue(ADMIN_KEY)  # the same second
    assert first != second
    assert sessions.valid(first, ADMIN_KEY) and sessions.valid(second, ADMIN_KEY)
    assert not sessions.valid(first, "another-key")
    session_id, expires, mac = first.split(".")
    assert not sessions.valid(f"{session_id}.{int(expires) + 1}.{mac}", ADMIN_KEY)
    assert not sessions.valid(f"{second.split('.')[0]}.{expires}.{mac}", ADMIN_KEY)
    for garbage in ("", "..", "a.b.c", "1.abc", first + "x"):
        assert not sessions.valid(garbage, ADMIN_KEY)

    sessions.revoke(first, ADMIN_KEY)
    assert not sessions.valid(first, ADMIN_KEY) and sessions.valid(second, ADMIN_KEY)
    restarted = Sessions(3600, tmp_path / "revoked.json", clock)  # read back from disk
    assert not restarted.valid(first, ADMIN_KEY) and restarted.valid(second, ADMIN_KEY)

    clock.now += 3600
    assert not sessions.valid(second, ADMIN_KEY)  # expired
    sessions.revoke(sessions.issue(ADMIN_KEY), ADMIN_KEY)
    assert session_id not in (tmp_path / "revoked.json").read_text()  # forgotten once expired anyway


def test_an_unreadable_revocation_list_ends_the_sessions_before_it(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "revoked.json"
    old = Sessions(3600, path, clock).issue(ADMIN_KEY)
    path.write_text("{not json")
    clock.now += 5
    sessions = Sessions(3600, path, clock)
    assert not sessions.valid(old, ADMIN_KEY)
    assert sessions.valid(sessions.issue(ADMIN_KEY), ADMIN_KEY)  # signing in again works


def sign_in(port: int) -> str:
    reply = raw_http.request(port, "POST", "/ui/login", [FORM], f"key={ADMIN_KEY}".encode())
    assert reply is not None and reply.status == 303, reply
    cookie = reply.header("set-cookie") or ""
    assert cookie.startswith(f"{SESSION_COOKIE}="), cookie
    return cookie


def status_with(port: int, cookie: str, target: str = "/admin/routes") -> int:
    reply = raw_http.request(port, "GET", target, [("Cookie", cookie.split(";")[0])])
    assert reply is not None
    return reply.status


def test_sign_out_ends_the_session_on_the_server(gateway_factory: GatewayFactory, data_dir: Path) -> None:
    gateway = gateway_factory(admin_key=ADMIN_KEY)
    first, second = sign_in(gateway.port), sign_in(gateway.port)
    assert first.split(";")[0] != second.split(";")[0]
    attributes = {part.strip().lower() for part in first.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/", "max-age=28800"} <= attributes  # 8 hours
    assert "secure" not in attributes  # plain http, secure_cookies: auto
    assert status_with(gateway.port, first) == 200 and status_with(gateway.port, first, "/ui/") == 200

    out = raw_http.request(gateway.port, "POST", "/ui/logout", [("Cookie", first.split(";")[0])])
    assert out is not None and out.status == 303
    assert (out.header("set-cookie") or "").startswith(f'{SESSION_COOKIE}=""')
    # A copy of the cookie (another tab, a stolen one) is dead too; the other sign-in is not.
    assert status_with(gateway.port, first) == 401 and status_with(gateway.port, first, "/ui/") == 401
    assert status_with(gateway.port, second) == 200

    # ... and stays dead after a restart.
    gateway.stop()
    again = start_gateway(gateway.settings)
    try:
        assert status_with(again.port, first) == 401 and status_with(again.port, second) == 200
    finally:
        again.stop()


@pytest.mark.parametrize(("mode", "secure"), [("auto", False), ("always", True)])
def test_secure_cookies_setting(gateway_factory: GatewayFactory, mode: str, secure: bool) -> None:
    gateway = gateway_factory(admin_key=ADMIN_KEY, ui={"secure_cookies": mode, "session_ttl_s": 600})
    attributes = {part.strip().lower() for part in sign_in(gateway.port).split(";")[1:]}
    assert ("secure" in attributes) is secure and "max-age=600" in attributes


def test_a_key_in_the_url_never_signs_in(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(admin_key=ADMIN_KEY)
    page = raw_http.request(gateway.port, "GET", f"/ui/?key={ADMIN_KEY}")
    assert page is not None and page.status == 401 and page.header("set-cookie") is None
    assert page.header("location") is None and b'<form class="login"' in page.body
    assert ADMIN_KEY.encode() not in page.body
    redirect = raw_http.request(gateway.port, "GET", f"/ui?key={ADMIN_KEY}")
    assert redirect is not None and redirect.status == 307 and redirect.header("location") == "ui/"


def test_settings_reject_unknown_secure_cookie_modes(tmp_path: Path) -> None:
    from gateway.settings import ConfigError

    config = tmp_path / "gateway.yaml"
    config.write_text("ui: {secure_cookies: sometimes}\n")
    with pytest.raises(ConfigError, match=r"ui\.secure_cookies"):
        load_settings(config, environ={})
