"""Shared pieces of the web edge: the OpenAI-shaped error response, query and body parsing."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

import orjson
import psycopg
import psycopg_pool
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.adaptive.controller import AdaptiveController
from gateway.errors import (
    Conflict,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    Unprocessable,
)
from gateway.services import Services
from gateway.settings import RouteSettings
from gateway.web.endpoints import Param

log = logging.getLogger("understudy.web")
M = TypeVar("M", bound=BaseModel)
# Admin bodies are a handful of fields; anything bigger is a mistake or an attack.
MAX_ADMIN_BODY = 64 * 1024
_PLUS_AS_SPACE = re.compile(r"(\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$")
_HTTP_ERROR_TYPES = {
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
}


def error_response(exc: GatewayError) -> Response:
    headers = {k.decode(): v.decode() for k, v in exc.headers()}
    return Response(exc.body_bytes(), status_code=exc.status, headers=headers)


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


# What the stores raise when their database fails (down, locked, full, out of connections).
STORE_FAILURES: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error, psycopg_pool.PoolTimeout)


async def handle_store_failure(request: Request, exc: Exception) -> Response:
    """An admin or dashboard call the store failed: 503 in OpenAI's shape, not a bare 500
    (the database's message stays in the log: it may name hosts or paths)."""
    log.warning("%s %s: the store failed: %s", request.method, request.url.path, exc)
    return error_response(StoreUnavailable())


async def handle_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no such path, wrong method) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    kind, code = _HTTP_ERROR_TYPES.get(exc.status_code, ("invalid_request_error", "http_error"))
    body = {"error": {"message": exc.detail, "type": kind, "param": None, "code": code}}
    return Response(
        orjson.dumps(body), status_code=exc.status_code, headers=exc.headers, media_type="application/json"
    )


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer") from None
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}")
    return value


def query_optional_int(request: Request, name: str, low: int, high: int) -> int | None:
    return None if request.query_params.get(name) is None else query_int(request, name, 0, low, high)


def query_choice(request: Request, name: str, choices: Sequence[str]) -> str | None:
    raw = request.query_params.get(name)
    if raw is not None and raw not in choices:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}")
    return raw


def parse_time(raw: str) -> float:
    """An ISO 8601 / RFC 3339 timestamp as epoch seconds (naive means UTC). ValueError if not.

    A `+hh:mm` offset typed unencoded in a URL arrives as ` hh:mm`; that is read as meant."""
    text = _PLUS_AS_SPACE.sub(r"\1+\2", raw.strip().upper().replace("Z", "+00:00"))
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def query_time(request: Request, name: str) -> float | None:
    """An ISO 8601 timestamp query parameter as epoch seconds (naive means UTC)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return parse_time(raw)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"'{name}' must be an ISO 8601 timestamp, got {raw[:40]!r}") from None


async def read_capped(request: Request, limit: int = MAX_ADMIN_BODY) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, model: type[M]) -> M:
    """The body as `model`: 400 when it is not JSON, 422 when the JSON does not validate."""
    raw = await read_capped(request)
    if not raw.strip():
        raise InvalidRequest("this endpoint needs a JSON body", code="missing_body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from None
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(map(str, first["loc"])) or None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise Unprocessable(f"invalid request body: {problems}", param=param) from None


ROUTE_NAME = Param(
    "name", "path", {"type": "string"}, "the route's name in gateway.yaml (`default` included)"
)


def route_of(services: Services, request: Request) -> RouteSettings:
    name = request.path_params["name"]
    route = services.routes.by_name.get(name)
    if route is None:
        raise NotFound(f"no route named {name[:64]!r}", code="route_not_found")
    return route


def adaptive_controller(services: Services, route: RouteSettings) -> AdaptiveController:
    """The controller, if `route` adapts; 409 otherwise (the route exists but has no cycle)."""
    controller = services.controller
    if controller is None or route.name not in controller.routes:
        why = "the local backend is off (local.enabled)" if route.adapt else "set adapt: true on it"
        raise Conflict(f"route {route.name!r} does not adapt: {why}", code="route_not_adaptive")
    return controller
