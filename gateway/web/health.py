"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.services import Services


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    services = _services(request)
    body: dict[str, object] = {"status": "ready" if services.started else "starting"}
    if services.backend is not None:
        body["local_backend"] = services.backend.status()
    if services.controller is not None:
        # Ready to proxy, but a route that cannot learn must show here, not only in a log.
        problems = services.controller.problems()
        body["routes"] = services.controller.summaries()
        if problems:
            body["problems"] = problems
            body["status"] = "degraded" if services.started else "starting"
    return JSONResponse(body, status_code=200 if services.started else 503)


async def metrics(request: Request) -> Response:
    payload, content_type = _services(request).metrics.render()
    return Response(payload, media_type=content_type)


routes = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
]
