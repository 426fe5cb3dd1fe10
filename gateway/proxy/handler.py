"""The /v1/* edge as a plain ASGI app: parse a little, pick the route, forward, log.

It is raw ASGI rather than a Starlette endpoint because it is the hot path: it forwards the
client's bytes untouched, streams chunk by chunk, and the record of each request is committed
before the response's last byte is sent (so a SIGKILL right after a reply loses nothing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson

from gateway.domain.exchange import Exchange, loggable_body
from gateway.domain.view import RequestView
from gateway.errors import (
    BadUpstreamResponse,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
)
from gateway.limits.headers import merge_rate_limit_headers
from gateway.origin import refuse_cross_origin
from gateway.proxy.assemble import StreamAssembler
from gateway.upstream.base import UpstreamRequest, UpstreamResponse
from gateway.upstream.headers import forward_headers

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger("understudy.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]

ROUTE_HEADER = b"x-understudy-route"
_DONE = b"data: [DONE]"
# OpenAI's endpoints, whose answers are JSON (or SSE events of JSON) whatever the upstream
# labels them: an HTML page or a broken event there is a fault, not an answer to pass on.
JSON_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models"}
)


def _header(headers: list[tuple[bytes, bytes]], name: bytes, encoding: str = "latin-1") -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode(encoding, "replace")
    return None


def upstream_path(scope: Scope) -> str:
    """The path below /v1, still percent-encoded as the client sent it. Dot segments are
    refused so a client can never step outside the upstream's API root."""
    path: str = scope["path"]
    if any(segment in (".", "..") for segment in path.split("/")):
        raise InvalidRequest("the path may not contain '.' or '..' segments", code="invalid_path")
    raw = scope.get("raw_path")
    text = raw.decode("latin-1").split("?", 1)[0] if raw else path
    return text[len("/v1") :]


def complete_events_end(buffer: bytes) -> int:
    """Length of the prefix of `buffer` made of whole SSE events (0 if none is complete)."""
    return max(buffer.rfind(b"\n\n") + 2, buffer.rfind(b"\r\n\r\n") + 4, 0)


async def read_body(receive: Any, limit: int, declared: str | None) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is larger than the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest(
                "the client disconnected while sending the request", code="client_disconnected"
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ProxyHandler:
    def __init__(self, services: Services):
        self.services = services
        self.max_body = services.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        ex = Exchange(method=scope["method"], endpoint=scope["path"])
        ex.client = self.services.client_name(scope)
        metrics = self.services.metrics
        metrics.inflight.labels("cloud").inc()
        try:
            await self._handle(ex, scope, receive, send)
        except GatewayError as exc:
            await self._fail(ex, send, exc)
        except Exception:  # a bug: still an OpenAI-shaped answer, and still a record
            log.exception("%s %s %s: unexpected error", ex.request_id, ex.method, ex.endpoint)
            await self._fail(ex, send, GatewayError("the gateway failed unexpectedly; see its log"))
        finally:
            metrics.inflight.labels(ex.backend).dec()
            self.services.observe(ex)

    async def _handle(self, ex: Exchange, scope: Scope, receive: Any, send: Any) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        refuse_cross_origin(scope)
        guard = self.services.guard
        key = guard.authenticate(headers) if guard is not None else None
        if key is not None:
            ex.client = key.name
        raw = await read_body(receive, self.max_body, _header(headers, b"content-length"))
        content_type = _header(headers, b"content-type") or ""
        ex.request_text = loggable_body(raw, content_type)
        view = RequestView.parse(raw, content_type)
        # UTF-8, as clients send it: an unknown route's name is echoed back in the error.
        route = self.services.routes.resolve(view.model, _header(headers, ROUTE_HEADER, "utf-8"))
        ex.route, ex.model, ex.stream = route.name, view.model, view.stream
        ex.request_body = view.body
        body, sent = raw, view
        if route.upstream_model and view.body is not None:
            # Upstreams that read the parsed body (litellm) must see the rewritten model too.
            sent = view.for_model(route.upstream_model)
            body = view.with_model(route.upstream_model)
            ex.upstream_model = route.upstream_model
        upstream = self.services.upstreams[route.upstream]
        drop_client_key = guard is not None and guard.requires_keys
        if upstream.api_key is None and not drop_client_key:
            # The gateway's own calls about this request (spot check, judge) pay with the same
            # key. A gateway client key never goes upstream, with its request or in those calls.
            ex.authorization = _header(headers, b"authorization")
        request = UpstreamRequest(
            method=ex.method,
            path=upstream_path(scope),
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=forward_headers(headers, upstream.api_key, drop_client_key),
            body=body,
            view=sent,
        )
        dispatcher = self.services.dispatcher
        plan = dispatcher.plan(route.name, ex.endpoint, view)
        if guard is None:
            await self._relay(ex, await dispatcher.send(ex, plan, upstream, request), receive, send)
            return
        # A route the local model serves waits in the local backend's pool, not the cloud's.
        async with guard.admit(ex, key, route, view, route.upstream, plan.pool):
            await self._relay(ex, await dispatcher.send(ex, plan, upstream, request), receive, send)

    async def _relay(self, ex: Exchange, response: UpstreamResponse, receive: Any, send: Any) -> None:
        ex.status = response.status
        if response.is_event_stream:
            await self._relay_stream(ex, response, receive, send)
        else:
            await self._relay_whole(ex, response, send)

    async def _relay_whole(self, ex: Exchange, response: UpstreamResponse, send: Any) -> None:
        payload = await response.read()
        ex.response_text = loggable_body(payload, response.content_type)
        if ex.status >= 400:
            ex.outcome = "error"
            ex.error = f"upstream answered {ex.status}"
        elif "json" in response.content_type or (ex.status < 300 and ex.endpoint in JSON_ENDPOINTS):
            self._read_answer(ex, payload, response.content_type)
        await self.services.commit(ex)
        headers = [*_response_headers(ex, response), (b"content-length", str(len(payload)).encode())]
        ex.response_started = True
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _read_answer(ex: Exchange, payload: bytes, content_type: str) -> None:
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # Passing a broken 200 on would only move the failure into the client's parser.
            raise BadUpstreamResponse(
                f"the upstream's answer is not valid JSON (content type {content_type or 'none'!r})"
            ) from None
        if not isinstance(answer, dict):
            return
        ex.answer = answer
        usage = answer.get("usage")
        ex.usage = usage if isinstance(usage, dict) else None
        choices = answer.get("choices")
        if isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices
        ):
            ex.outcome = "truncated"

    async def _relay_stream(self, ex: Exchange, response: UpstreamResponse, receive: Any, send: Any) -> None:
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected, response))
        assembler = StreamAssembler()
        headers = _response_headers(ex, response)
        ex.response_started = True
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        held = b""
        try:
            held = await self._pump(ex, response, send, assembler, disconnected)
        except GatewayError as exc:
            if disconnected.is_set():
                ex.outcome, ex.error = "disconnected", "the client disconnected mid-stream"
            else:
                ex.outcome, ex.error = "error", exc.message
                held = exc.sse_event()
        finally:
            watcher.cancel()
            response.close()
        ex.first_token_at = assembler.first_token_at
        ex.usage = assembler.usage
        ex.answer = assembler.result()
        ex.response_text = loggable_body(orjson.dumps(ex.answer), "application/json")
        if ex.outcome == "ok" and "length" in assembler.finish_reasons:
            ex.outcome = "truncated"
        if ex.status >= 400 and ex.outcome == "ok":
            ex.outcome, ex.error = "error", f"upstream answered {ex.status}"
        await self.services.commit(ex)
        await send({"type": "http.response.body", "body": held, "more_body": False})

    async def _pump(
        self,
        ex: Exchange,
        response: UpstreamResponse,
        send: Any,
        assembler: StreamAssembler,
        disconnected: asyncio.Event,
    ) -> bytes:
        """Forward whole SSE events as they arrive; return the bytes held back (the final
        `[DONE]` event onwards) to be sent only once the record is durable."""
        buffer = b""
        held = b""
        async for chunk in response.iter_chunks():
            if held:
                held += chunk
                continue
            buffer += chunk
            end = complete_events_end(buffer)
            if not end:
                continue
            events, buffer = buffer[:end], buffer[end:]
            done_at = events.find(_DONE)
            if done_at >= 0:
                events, held = events[:done_at], events[done_at:] + buffer
                buffer = b""
            if events:
                _feed(ex, assembler, events)
                await send({"type": "http.response.body", "body": events, "more_body": True})
            if disconnected.is_set():
                ex.outcome, ex.error = "disconnected", "the client disconnected mid-stream"
                return b""
        if buffer:  # an unterminated last event: pass it on as it came
            _feed(ex, assembler, buffer + b"\n\n")
            held = buffer + held
        return held

    async def _fail(self, ex: Exchange, send: Any, exc: GatewayError) -> None:
        ex.status, ex.outcome, ex.error = exc.status, "error", exc.message
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", ex.method, ex.endpoint, exc.status, exc.message)
        body = exc.body_bytes()
        await self.services.commit(ex)
        if ex.response_started:  # too late for a status: end the body with the error event
            await send({"type": "http.response.body", "body": exc.sse_event(), "more_body": False})
            return
        ex.response_started = True
        headers = [*exc.headers(), *ex.gateway_headers(), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _feed(ex: Exchange, assembler: StreamAssembler, events: bytes) -> None:
    """Assemble whole events; a broken one on an OpenAI endpoint ends the stream (before it
    reaches the client, whose SDK would fail on it with a parse error instead)."""
    assembler.feed(events)
    if assembler.invalid_events and ex.endpoint in JSON_ENDPOINTS:
        raise BadUpstreamResponse("the upstream's stream carried an event that is not valid JSON")


def _response_headers(ex: Exchange, response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    if ex.limit_headers is None:
        return [*response.headers, *ex.gateway_headers()]
    return merge_rate_limit_headers(response.headers, ex.gateway_headers())


async def _watch_disconnect(receive: Any, disconnected: asyncio.Event, response: UpstreamResponse) -> None:
    """Wait for the client to leave; then stop reading the upstream (which ends its work)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            response.close()
            return
