"""The dashboard: `/ui/` serves a static page (plain JS and CSS from gateway/static, no build
step, nothing from a CDN) that polls `GET /admin/dashboard` every few seconds.

Same admin auth as the API. A browser signs in with the form (a POST: the key never appears
in a URL, where history, logs and Referer headers would keep it) and gets a session cookie
(see `auth.Sessions`); signing out ends that session on the server too. Without a configured
key, loopback browsers need no sign-in.
"""

from __future__ import annotations

import asyncio
import html
import time
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.errors import Forbidden, GatewayError, Unauthorized
from gateway.services import Services
from gateway.web.auth import SESSION_COOKIE, Sessions, key_matches, require_admin, sessions_of
from gateway.web.common import read_capped
from gateway.web.costs import ledger_money, with_ledger
from gateway.web.endpoints import Endpoint
from gateway.web.overview import route_totals, route_view
from gateway.web.schemas import Dashboard, DashboardRoute, RouteTotals
from gateway.web.timeline import Point, Timeline

STATIC = Path(__file__).resolve().parent.parent / "static"
_EMPTY_TOTALS = RouteTotals(
    requests={"cloud": 0, "local": 0, "failover": 0}, cost_usd=0.0, cost_saved_usd=0.0
)
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _local_backend(services: Services) -> str | None:
    if not services.settings.local.enabled:
        return None
    if services.backend is None:
        return "external"
    return "healthy" if services.backend.healthy.is_set() else "starting"


def _route_views(services: Services, series: dict[str, list[Point]]) -> list[DashboardRoute]:
    totals = route_totals(services.metrics.families())
    money = ledger_money(services)
    return [
        route_view(
            services,
            route,
            series[route.name],
            with_ledger(totals.get(route.name, _EMPTY_TOTALS), money.get(route.name, {})),
        )
        for route in services.routes.routes
    ]


async def get_dashboard(request: Request, services: Services) -> Dashboard:
    timeline: Timeline = request.app.state.timeline
    series = {route.name: timeline.series(route.name) for route in services.routes.routes}
    views = await asyncio.to_thread(_route_views, services, series)
    return Dashboard(
        generated_at=time.time(),
        started_at=timeline.started_at,
        ready=services.started,
        local_backend=_local_backend(services),
        interval_s=timeline.interval_s,
        routes=views,
    )


# --- the page and signing in ---------------------------------------------------------------


def _page(name: str, status: int = 200, message: str = "") -> Response:
    text = (STATIC / name).read_text(encoding="utf-8").replace("{{message}}", html.escape(message))
    return Response(text, status_code=status, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


def _secure(request: Request) -> bool:
    return request.app.state.services.settings.ui.secure_cookies == "always" or request.url.scheme == "https"


def _sessions(request: Request) -> Sessions:
    sessions = sessions_of(request)
    assert sessions is not None, "create_app puts the sessions on app.state"
    return sessions


def _signed_in(request: Request, admin_key: str) -> Response:
    """Back to the page, now with a session cookie."""
    sessions = _sessions(request)
    response = RedirectResponse("./", status_code=303, headers={"cache-control": "no-store"})
    response.set_cookie(
        SESSION_COOKIE,
        sessions.issue(admin_key),
        max_age=int(sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


async def ui_redirect(request: Request) -> Response:
    # Not the query: it is nothing the page uses, and may be a key someone pasted.
    return RedirectResponse("ui/", status_code=307)


async def ui_page(request: Request) -> Response:
    admin_key = request.app.state.services.settings.admin_key
    if "key" in request.query_params:
        # Never a sign-in: a key in a URL stays in history, proxy logs and Referer headers.
        return _page("login.html", 401, "Sign in with this form: a key in the address is not used.")
    try:
        require_admin(request, admin_key)
    except Forbidden as exc:
        return _page("login.html", 403, exc.message)
    except Unauthorized:
        return _page("login.html", 401)
    return _page("index.html")


async def login(request: Request) -> Response:
    admin_key = request.app.state.services.settings.admin_key
    if admin_key is None:
        return RedirectResponse("./", status_code=303)
    try:
        form = parse_qs((await read_capped(request, 4096)).decode("utf-8", "replace"))
    except GatewayError:
        form = {}
    offered = (form.get("key") or [""])[0].strip()
    if offered and key_matches(offered, admin_key):
        return _signed_in(request, admin_key)
    return _page("login.html", 401, "That key is not the admin key.")


async def logout(request: Request) -> Response:
    admin_key = request.app.state.services.settings.admin_key
    cookie = request.cookies.get(SESSION_COOKIE)
    if admin_key is not None and cookie is not None:
        await asyncio.to_thread(_sessions(request).revoke, cookie, admin_key)
    response = RedirectResponse("./", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


endpoints = [
    Endpoint(
        "GET",
        "/admin/dashboard",
        get_dashboard,
        "Everything the dashboard shows, in one call (polled by /ui)",
        Dashboard,
        tag="dashboard",
    ),
]

routes: list[BaseRoute] = [
    Route("/ui", ui_redirect, methods=["GET"]),
    Route("/ui/", ui_page, methods=["GET"]),
    Route("/ui/login", login, methods=["POST"]),
    Route("/ui/logout", logout, methods=["POST"]),
    # Static assets hold no data and no secrets: served without sign-in (the login page uses them).
    Mount("/ui/assets", StaticFiles(directory=STATIC), name="ui-assets"),
]
