"""The HTTP edge: vLLM's OpenAI server shape on Starlette. Each handler parses its body,
calls the engine (through chat/completions planning), and shapes the answer.

`create_app(settings)` does no work at import or construction beyond wiring: the model
loads in a background thread once the server starts, and `/health` answers 503 until then.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from local_backend.chat import chat_response, chat_stream, plan_chat
from local_backend.completions import completion_response, completion_stream, plan_completion
from local_backend.engine import Engine, EngineState
from local_backend.errors import BackendError, InvalidRequest, MethodNotAllowed, RouteNotFound
from local_backend.metrics import BackendMetrics
from local_backend.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from local_backend.serving import collect_unless_disconnected
from local_backend.settings import Settings

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)
LoadFailureCallback = Callable[[BaseException], None]
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_CLIENT_CLOSED = 499


def create_app(settings: Settings, on_load_failure: LoadFailureCallback | None = None) -> Starlette:
    """The backend's ASGI app; `on_load_failure` is called (on the loop) if the model cannot load."""
    metrics = BackendMetrics()
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
    ]
    known_paths = frozenset(route.path for route in routes)
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestMetrics, metrics=metrics, known_paths=known_paths)],
        exception_handlers={
            BackendError: backend_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = Engine(settings, metrics)
    app.state.on_load_failure = on_load_failure
    return app


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    engine: Engine = app.state.engine
    loop = asyncio.get_running_loop()

    def load() -> None:
        try:
            engine.load()
        except Exception as exc:  # already logged by the engine; the callback decides the exit
            callback = app.state.on_load_failure
            if callback is not None:
                loop.call_soon_threadsafe(callback, exc)

    # A daemon thread, not to_thread: a shutdown during a slow load must not wait for it.
    threading.Thread(target=load, name="model-loader", daemon=True).start()
    try:
        yield
    finally:
        await asyncio.to_thread(engine.stop)


# ---------------------------------------------------------------- handlers


async def health(request: Request) -> Response:
    engine = _engine(request)
    if engine.ready:
        # A failed LoRA self-test still answers 200: the base model serves, and a supervisor
        # restarting the process would not fix the library stack. Callers read the field.
        ready: dict[str, Any] = {"status": "ok", "model": engine.model_name}
        if engine.lora_selftest is not None:
            ready["lora_selftest"] = engine.lora_selftest.as_json()
        return _json(ready)
    body: dict[str, Any] = {"status": engine.state.value}
    if engine.state is EngineState.FAILED:
        body["error"] = engine.error
    return _json(body, status=503, headers={"Retry-After": "2"})


async def metrics_endpoint(request: Request) -> Response:
    metrics: BackendMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> Response:
    engine = _engine(request)
    max_len = engine.max_model_len if engine.ready else None
    cards = [
        ModelCard(id=m.name, created=m.created, root=m.root, parent=m.parent, max_model_len=max_len)
        for m in (engine.served_models() if engine.ready else [])
    ]
    return _json(ModelList(data=cards).model_dump())


async def chat_completions(request: Request) -> Response:
    body = await _parse(request, ChatCompletionRequest)
    engine = _engine(request)
    plan = await asyncio.to_thread(plan_chat, engine, body)
    engine.submit(plan.job, body.model)
    if body.stream:
        return StreamingResponse(chat_stream(plan), media_type="text/event-stream", headers=_SSE_HEADERS)
    results = await collect_unless_disconnected(request, plan.job)
    if results is None:
        return Response(status_code=_CLIENT_CLOSED)
    return _json(chat_response(plan, results).model_dump())


async def completions(request: Request) -> Response:
    body = await _parse(request, CompletionRequest)
    engine = _engine(request)
    plan = await asyncio.to_thread(plan_completion, engine, body)
    engine.submit(plan.job, body.model)
    if body.stream:
        return StreamingResponse(
            completion_stream(plan), media_type="text/event-stream", headers=_SSE_HEADERS
        )
    results = await collect_unless_disconnected(request, plan.job)
    if results is None:
        return Response(status_code=_CLIENT_CLOSED)
    return _json(completion_response(plan, results).model_dump())


async def load_lora_adapter(request: Request) -> Response:
    body = await _parse(request, LoadLoRAAdapterRequest)
    await _engine(request).load_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    body = await _parse(request, UnloadLoRAAdapterRequest)
    await _engine(request).unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# ---------------------------------------------------------------- errors


async def backend_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackendError)
    return _json(exc.body(), status=exc.status_code, headers=exc.headers())


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        error: BackendError = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif exc.status_code == 404:
        error = RouteNotFound(f"no such endpoint: {request.url.path}")
    else:
        error = InvalidRequest(str(exc.detail))
        error.status_code = exc.status_code
    return await backend_error(request, error)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return await backend_error(request, BackendError(f"internal error: {type(exc).__name__}"))


# ---------------------------------------------------------------- helpers


class RequestMetrics:
    """Counts answered requests by endpoint and status (unknown paths counted as "other")."""

    def __init__(self, app: ASGIApp, metrics: BackendMetrics, known_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = scope["path"] if scope["path"] in self.known_paths else "other"
            self.metrics.requests.labels(path, str(status)).inc()


async def _parse(request: Request, model: type[Body]) -> Body:
    content_type = request.headers.get("content-type")
    if content_type is not None and "json" not in content_type.lower():
        # Any web page can make a browser post text/plain or a form to a loopback server
        # (no CORS preflight for those): read only JSON, as FastAPI (and so vLLM) does.
        raise InvalidRequest(
            f"the body must be JSON (Content-Type: application/json), not {content_type[:64]!r}"
        )
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(
            f"{where}: {first['msg']}" if where else first["msg"], param=where or None
        ) from exc


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)
