"""Admin REST API (Bearer UNDERSTUDY_ADMIN_KEY): routes and their adaptive cycle, training jobs,
adapters; the log endpoints live in `logs`, the dashboard's in `dashboard`. Lists are
{"data": [...], "next_cursor"}; errors are OpenAI-shaped (see `endpoints` for the statuses)."""

from __future__ import annotations

import asyncio
import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.errors import Conflict, NotFound
from gateway.services import Services
from gateway.settings import RouteSettings
from gateway.store.base import RecordFilter
from gateway.web import costs, dashboard, datasets, logs
from gateway.web.common import ROUTE_NAME, adaptive_controller, json_body, route_of
from gateway.web.endpoints import Endpoint, Param, build_routes, openapi_document
from gateway.web.schemas import (
    AdapterList,
    AdapterOut,
    AdapterRequest,
    EvalAccepted,
    EvalOut,
    JobAccepted,
    JobStatus,
    ModeRequest,
    RouteDetail,
    RouteList,
    RouteSummary,
    Traffic,
)
from trainer.errors import JobConflict


def route_summary(services: Services, route: RouteSettings) -> RouteSummary:
    summary: dict[str, Any] = {
        "name": route.name,
        "match": route.match,
        "upstream": route.upstream,
        "upstream_model": route.upstream_model,
        "adapt": route.adapt,
        "local_model": route.local_model,
        "policy": route.policy,
    }
    controller = services.controller
    if controller is not None and route.name in controller.routes:
        summary.update(controller.describe(route.name))
    return RouteSummary.model_validate(summary)


async def list_routes(request: Request, services: Services) -> RouteList:
    return RouteList(data=[route_summary(services, route) for route in services.routes.routes])


def _traffic(services: Services, route: str) -> Traffic:
    counts = {
        backend: services.store.count_records(RecordFilter(route=route, backend=backend, kind="user"))
        for backend in ("cloud", "local", "failover")
    }
    return Traffic.model_validate(counts)


async def get_route(request: Request, services: Services) -> RouteDetail:
    route = route_of(services, request)
    summary = route_summary(services, route)
    traffic = await asyncio.to_thread(_traffic, services, route.name)
    evals = await asyncio.to_thread(services.store.list_evals, route.name, 20)
    return RouteDetail.model_validate(
        {
            **summary.model_dump(by_alias=True),
            "traffic": traffic,
            "recent_evals": [EvalOut.model_validate(e) for e in evals],
        }
    )


async def set_mode(request: Request, services: Services) -> RouteSummary:
    route = route_of(services, request)
    body = await json_body(request, ModeRequest)
    await adaptive_controller(services, route).set_mode(route.name, body.mode)
    return route_summary(services, route)


async def train_route(request: Request, services: Services) -> JobAccepted:
    route = route_of(services, request)
    controller = adaptive_controller(services, route)
    try:
        job_id = await controller.train_now(route.name)
    except JobConflict as exc:
        raise Conflict(str(exc), code="job_running") from None
    return JobAccepted(job_id=job_id)


async def get_job(request: Request, services: Services) -> JobStatus:
    job_id = request.path_params["job_id"]
    job = services.controller.jobs.status(job_id) if services.controller is not None else None
    if job is None:
        raise NotFound(f"no training job {job_id[:64]!r}", code="job_not_found")
    return JobStatus.model_validate(job)


async def cancel_job(request: Request, services: Services) -> JobStatus:
    job_id = request.path_params["job_id"]
    jobs = services.controller.jobs if services.controller is not None else None
    if jobs is None or jobs.status(job_id) is None:
        raise NotFound(f"no training job {job_id[:64]!r}", code="job_not_found")
    if not await jobs.cancel(job_id):
        raise Conflict(f"training job {job_id[:64]!r} is not running", code="job_not_running")
    return JobStatus.model_validate(jobs.status(job_id))


async def eval_route(request: Request, services: Services) -> EvalAccepted:
    route = route_of(services, request)
    version = await adaptive_controller(services, route).eval_now(route.name)
    return EvalAccepted(adapter_version=version)


async def list_adapters(request: Request, services: Services) -> AdapterList:
    route = route_of(services, request)
    controller = adaptive_controller(services, route)
    state = controller.runtime(route.name).state
    versions = await asyncio.to_thread(controller.adapters.versions, route.name)
    data = [
        AdapterOut(
            version=v.version,
            path=str(v.path),
            active=v.version == state.active_version,
            candidate=v.version == state.candidate_version,
            meta=v.meta,
        )
        for v in reversed(versions)
    ]
    return AdapterList(data=data)


async def set_adapter(request: Request, services: Services) -> RouteSummary:
    route = route_of(services, request)
    body = await json_body(request, AdapterRequest)
    controller = adaptive_controller(services, route)
    known = {v.version for v in await asyncio.to_thread(controller.adapters.versions, route.name)}
    if body.version not in known:
        raise NotFound(f"route {route.name!r} has no adapter v{body.version}", code="adapter_not_found")
    await controller.set_adapter(route.name, body.version)  # LocalBackendError → 502
    return route_summary(services, route)


async def get_openapi(request: Request, services: Services) -> Response:
    return Response(_openapi_json(), media_type="application/json")


def _package_version() -> str:
    try:
        return version("understudy")
    except PackageNotFoundError:
        return "0"


@functools.cache
def _openapi_json() -> bytes:
    return orjson.dumps(openapi_document(endpoints, _package_version()))


endpoints: list[Endpoint] = [
    *logs.endpoints,
    *datasets.endpoints,
    Endpoint("GET", "/admin/routes", list_routes, "Every configured route and its state", RouteList),
    Endpoint(
        "GET",
        "/admin/routes/{name}",
        get_route,
        "One route: state, traffic by backend, recent evals",
        RouteDetail,
        params=(ROUTE_NAME,),
        errors=(404,),
    ),
    Endpoint(
        "POST",
        "/admin/routes/{name}/mode",
        set_mode,
        "Pin the route to cloud or local, or return it to auto",
        RouteSummary,
        body=ModeRequest,
        params=(ROUTE_NAME,),
        errors=(400, 404, 409, 413, 422),
    ),
    Endpoint(
        "POST",
        "/admin/routes/{name}/train",
        train_route,
        "Start a training job now (202), or 409 while one runs",
        JobAccepted,
        status=202,
        params=(ROUTE_NAME,),
        errors=(404, 409),
    ),
    Endpoint(
        "POST",
        "/admin/routes/{name}/eval",
        eval_route,
        "Re-run the held-out evaluation of the candidate (or serving) adapter",
        EvalAccepted,
        status=202,
        params=(ROUTE_NAME,),
        errors=(404, 409),
    ),
    Endpoint(
        "GET",
        "/admin/routes/{name}/adapters",
        list_adapters,
        "The route's adapter versions, newest first",
        AdapterList,
        params=(ROUTE_NAME,),
        errors=(404, 409),
    ),
    Endpoint(
        "POST",
        "/admin/routes/{name}/adapter",
        set_adapter,
        "Serve another adapter version (roll back or forward)",
        RouteSummary,
        body=AdapterRequest,
        params=(ROUTE_NAME,),
        errors=(400, 404, 409, 413, 422, 502),
    ),
    Endpoint(
        "GET",
        "/admin/jobs/{job_id}",
        get_job,
        "A training job's status",
        JobStatus,
        params=(Param("job_id", "path", {"type": "string"}, "from POST .../train"),),
        errors=(404,),
    ),
    Endpoint(
        "POST",
        "/admin/jobs/{job_id}/cancel",
        cancel_job,
        "Stop a running training job (it ends as `error`, message `cancelled`)",
        JobStatus,
        params=(Param("job_id", "path", {"type": "string"}, "from POST .../train"),),
        errors=(404, 409),
    ),
    *costs.endpoints,
    *dashboard.endpoints,
    Endpoint(
        "GET",
        "/admin/openapi.json",
        get_openapi,
        "This document",
        None,
        raw_schema={"type": "object", "required": ["openapi", "paths"]},
        tag="meta",
    ),
]

routes: list[BaseRoute] = [*build_routes(endpoints), *dashboard.routes]
