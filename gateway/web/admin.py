"""Admin REST API (Bearer UNDERSTUDY_ADMIN_KEY). Lists are {"data": [...], "next_cursor"}."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import InvalidRequest
from gateway.services import Services
from gateway.store.base import RecordFilter
from gateway.web.auth import require_admin
from gateway.web.common import query_int, query_time


def _admin(request: Request) -> Services:
    services: Services = request.app.state.services
    require_admin(request, services.settings.admin_key)
    return services


def _record_filter(request: Request) -> RecordFilter:
    params = request.query_params
    cursor = params.get("cursor")
    if cursor is not None and not cursor.isdigit():
        raise InvalidRequest("'cursor' must be a cursor returned by a previous page")
    status = params.get("status")
    if status is not None and not status.isdigit():
        raise InvalidRequest("'status' must be an HTTP status code")
    return RecordFilter(
        route=params.get("route"),
        backend=params.get("backend"),
        status=int(status) if status else None,
        kind=params.get("kind"),
        since=query_time(request, "since"),
        until=query_time(request, "until"),
        before_id=int(cursor) if cursor else None,
    )


async def list_logs(request: Request) -> Response:
    services = _admin(request)
    limit = query_int(request, "limit", 50, 1, 1000)
    where = _record_filter(request)
    rows = await asyncio.to_thread(services.store.list_records, where, limit + 1)
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return JSONResponse({"data": rows[:limit], "next_cursor": next_cursor})


routes = [
    Route("/admin/logs", list_logs, methods=["GET"]),
]
