"""Admin REST API (Bearer UNDERSTUDY_ADMIN_KEY). Lists are {"data": [...], "next_cursor"}."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.adaptive.controller import AdaptiveController
from gateway.errors import InvalidRequest, NotFound
from gateway.services import Services
from gateway.settings import RouteSettings
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


async def export_logs(request: Request) -> Response:
    """All matching records, oldest first, as JSONL streamed page by page (never in memory)."""
    services = _admin(request)
    where = _record_filter(request)
    rows = services.store.iter_records(route=where.route, kind=where.kind)

    async def lines() -> AsyncIterator[bytes]:
        while True:
            page = await asyncio.to_thread(_next_page, rows, 200)
            if not page:
                return
            yield b"".join(orjson.dumps(row) + b"\n" for row in page)

    route = where.route or "all"
    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="understudy-{route}.jsonl"'},
    )


def _next_page(rows: Any, size: int) -> list[dict[str, Any]]:
    return [row for _, row in zip(range(size), rows, strict=False)]


async def delete_logs(request: Request) -> Response:
    services = _admin(request)
    route = request.query_params.get("route")
    before = query_time(request, "before")
    if route is None and before is None:
        raise InvalidRequest("give 'route' and/or 'before' (ISO 8601): refusing to delete every record")
    deleted = await asyncio.to_thread(services.store.delete_records, route, before)
    return JSONResponse({"deleted": deleted})


# --- routes and the adaptive cycle --------------------------------------------------------


class ModeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["cloud", "local", "auto"]


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"invalid request body: {problems}", code="invalid_body") from None


def _route(services: Services, name: str) -> RouteSettings:
    route = services.routes.by_name.get(name)
    if route is None:
        raise NotFound(f"no route named {name[:64]!r}")
    return route


def _controller(services: Services) -> AdaptiveController:
    if services.controller is None:
        raise NotFound("no route adapts (set adapt: true on a route and keep the local backend on)")
    return services.controller


def route_summary(services: Services, route: RouteSettings) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "name": route.name,
        "match": route.match,
        "upstream": route.upstream,
        "adapt": route.adapt,
        "local_model": route.local_model,
        "policy": route.policy.model_dump(),
        "mode": "cloud",
        "serving": "cloud",
    }
    controller = services.controller
    if controller is not None and route.name in controller.routes:
        summary.update(controller.describe(route.name))
    return summary


async def list_routes(request: Request) -> Response:
    services = _admin(request)
    data = [route_summary(services, route) for route in services.routes.routes]
    return JSONResponse({"data": data, "next_cursor": None})


async def get_route(request: Request) -> Response:
    services = _admin(request)
    route = _route(services, request.path_params["name"])
    summary = route_summary(services, route)
    summary["traffic"] = await asyncio.to_thread(_traffic, services, route.name)
    summary["recent_evals"] = await asyncio.to_thread(services.store.list_evals, route.name, 20)
    return JSONResponse(summary)


def _traffic(services: Services, route: str) -> dict[str, int]:
    return {
        backend: services.store.count_records(RecordFilter(route=route, backend=backend, kind="user"))
        for backend in ("cloud", "local", "failover")
    }


async def set_mode(request: Request) -> Response:
    services = _admin(request)
    name = _route(services, request.path_params["name"]).name
    body = await _body(request, ModeBody)
    await _controller(services).set_mode(name, body.mode)
    return JSONResponse(route_summary(services, services.routes.by_name[name]))


async def train_route(request: Request) -> Response:
    services = _admin(request)
    name = _route(services, request.path_params["name"]).name
    job_id = await _controller(services).train_now(name)
    return JSONResponse({"job_id": job_id}, status_code=202)


async def get_job(request: Request) -> Response:
    services = _admin(request)
    job = _controller(services).jobs.status(request.path_params["job_id"])
    if job is None:
        raise NotFound(f"no training job {request.path_params['job_id'][:64]!r}")
    return JSONResponse(job)


async def eval_route(request: Request) -> Response:
    services = _admin(request)
    name = _route(services, request.path_params["name"]).name
    version = await _controller(services).eval_now(name)
    return JSONResponse({"adapter_version": version, "status": "started"}, status_code=202)


async def list_adapters(request: Request) -> Response:
    services = _admin(request)
    name = _route(services, request.path_params["name"]).name
    controller = _controller(services)
    state = controller.runtime(name).state
    versions = await asyncio.to_thread(controller.adapters.versions, name)
    data = [
        {
            "version": v.version,
            "path": str(v.path),
            "active": v.version == state.active_version,
            "candidate": v.version == state.candidate_version,
            "meta": v.meta,
        }
        for v in reversed(versions)
    ]
    return JSONResponse({"data": data, "next_cursor": None})


async def set_adapter(request: Request) -> Response:
    services = _admin(request)
    name = _route(services, request.path_params["name"]).name
    body = await _body(request, AdapterBody)
    controller = _controller(services)
    known = {v.version for v in await asyncio.to_thread(controller.adapters.versions, name)}
    if body.version not in known:
        raise NotFound(f"route {name!r} has no adapter v{body.version}")
    await controller.set_adapter(name, body.version)
    return JSONResponse(route_summary(services, services.routes.by_name[name]))


_NAME = "{name:str}"

routes = [
    Route("/admin/logs", list_logs, methods=["GET"]),
    Route("/admin/logs", delete_logs, methods=["DELETE"]),
    Route("/admin/logs/export", export_logs, methods=["GET"]),
    Route("/admin/routes", list_routes, methods=["GET"]),
    Route(f"/admin/routes/{_NAME}", get_route, methods=["GET"]),
    Route(f"/admin/routes/{_NAME}/mode", set_mode, methods=["POST"]),
    Route(f"/admin/routes/{_NAME}/train", train_route, methods=["POST"]),
    Route(f"/admin/routes/{_NAME}/eval", eval_route, methods=["POST"]),
    Route(f"/admin/routes/{_NAME}/adapters", list_adapters, methods=["GET"]),
    Route(f"/admin/routes/{_NAME}/adapter", set_adapter, methods=["POST"]),
    Route("/admin/jobs/{job_id:str}", get_job, methods=["GET"]),
]
