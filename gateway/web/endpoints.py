"""The admin API as data: each endpoint declares its method, path, parameters, body, answer
and errors once; the Starlette routes and the OpenAPI 3.1 document are both built from that.

Every admin route authenticates before its handler runs, and a handler returns a pydantic
model (rendered as JSON with the endpoint's status) or a ready Response (a stream).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.services import Services
from gateway.web.auth import require_admin
from gateway.web.schemas import ErrorResponse

Handler = Callable[[Request, Services], Awaitable[BaseModel | Response]]
AUTH_ERRORS = (401, 403)
ERROR_TEXT = {
    400: "Malformed request: a bad query parameter or a body that is not JSON",
    401: "Missing or wrong admin key",
    403: "No admin key is configured and the client is not on loopback",
    404: "No such route, job or adapter",
    409: "The route's state does not allow this now",
    413: "The request body is too large",
    422: "The JSON body does not validate; `error.param` names the field",
    502: "The local backend could not do it",
}


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["query", "path"]
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    # None: the answer is not JSON (see `media_type`).
    response: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    media_type: str = "application/json"
    # The answer's schema when it is not a model (`response` None).
    raw_schema: dict[str, Any] | None = None
    # A body that is not JSON (an upload): (media type, schema).
    upload: tuple[str, dict[str, Any]] | None = None
    tag: str = "admin"


def render(model: BaseModel, status: int) -> Response:
    return Response(model.model_dump_json(by_alias=True), status_code=status, media_type="application/json")


def _dispatcher(by_method: dict[str, Endpoint]) -> Callable[[Request], Awaitable[Response]]:
    async def dispatch(request: Request) -> Response:
        services: Services = request.app.state.services
        require_admin(request, services.settings.admin_key)
        endpoint = by_method["GET" if request.method == "HEAD" else request.method]
        result = await endpoint.handler(request, services)
        return result if isinstance(result, Response) else render(result, endpoint.status)

    return dispatch


def build_routes(endpoints: Sequence[Endpoint]) -> list[Route]:
    """One Starlette route per path (so a wrong method is a 405 naming every allowed one)."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint
    return [
        Route(path, _dispatcher(by_method), methods=list(by_method)) for path, by_method in by_path.items()
    ]


# --- the OpenAPI document -----------------------------------------------------------------


def _schemas(endpoints: Sequence[Endpoint]) -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorResponse, "serialization"): None}
    for endpoint in endpoints:
        if endpoint.body is not None:
            wanted[(endpoint.body, "validation")] = None
        if endpoint.response is not None:
            wanted[(endpoint.response, "serialization")] = None
    refs, top = models_json_schema(list(wanted), by_alias=True, ref_template="#/components/schemas/{model}")
    return refs, top.get("$defs", {})


def _operation(endpoint: Endpoint, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    error_ref = refs[(ErrorResponse, "serialization")]
    if endpoint.response is not None:
        ok_schema = refs[(endpoint.response, "serialization")]
    else:
        ok_schema = endpoint.raw_schema or {"type": "string"}
    responses: dict[str, Any] = {
        str(endpoint.status): {
            "description": endpoint.summary,
            "content": {endpoint.media_type: {"schema": ok_schema}},
        }
    }
    for status in sorted({*endpoint.errors, *AUTH_ERRORS}):
        responses[str(status)] = {
            "description": ERROR_TEXT[status],
            "content": {"application/json": {"schema": error_ref}},
        }
    operation: dict[str, Any] = {
        "operationId": endpoint.handler.__name__,
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "parameters": [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required or p.where == "path",
                "description": p.description,
                "schema": p.schema,
            }
            for p in endpoint.params
        ],
        "responses": responses,
    }
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(endpoint.body, "validation")]}},
        }
    if endpoint.upload is not None:
        media, schema = endpoint.upload
        operation["requestBody"] = {"required": True, "content": {media: {"schema": schema}}}
    return operation


def openapi_document(endpoints: Sequence[Endpoint], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `endpoints` (schemas are JSON Schema 2020-12, from pydantic)."""
    refs, schemas = _schemas(endpoints)
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Understudy admin API",
            "version": version,
            "description": "Routes, their adaptive cycle, training jobs, adapters and the request log. "
            "Authenticate with `Authorization: Bearer $UNDERSTUDY_ADMIN_KEY` (without a configured key "
            "only loopback clients are let in). Errors use OpenAI's shape.",
        },
        "servers": [{"url": "/"}],
        "security": [{"adminKey": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }
