"""Shared pieces of the web edge: the OpenAI-shaped error response and query parsing."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, InvalidRequest


def error_response(exc: GatewayError) -> Response:
    headers = {k.decode(): v.decode() for k, v in exc.headers()}
    return Response(exc.body_bytes(), status_code=exc.status, headers=headers)


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


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


def query_time(request: Request, name: str) -> float | None:
    """An ISO 8601 timestamp query parameter as epoch seconds (naive means UTC)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 timestamp, got {raw[:40]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
