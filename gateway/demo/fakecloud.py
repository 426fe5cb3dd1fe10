"""A scripted OpenAI-compatible cloud on a real socket, for tests, benchmarks and the demo.

Behaviour is chosen by the request's `model` (like TensorZero's dummy provider):
  echo (any other name)  answers "echo: <last user message>"
  tool*                  answers with a tool call to the first tool offered
  json*                  answers with a JSON object
  length*                stops with finish_reason "length"
  error-<status>[-<s>]   answers that status with an OpenAI error body (429 and 503 carry
                         Retry-After: <s>, default 1)
  slow-<ms>              waits before the first byte
  stall-<ms>             sends the headers at once, then waits before the body (or stream)
  cut                    an answer that stops mid-way (connection dropped), streamed or not
  drop                   closes the connection without answering
  garbage                an invalid JSON body labelled application/json
  garbage-stream         a stream whose events turn into invalid JSON mid-way
  html                   a 200 HTML page (a proxy or portal in the way, not the API)
  endless                an answer that never ends, streamed or not
  endless-<n>            a stream that never ends, <n> characters an event
  huge-<n>               answers <n> characters of text
An `answer` function can script the reply text instead (the demo's narrow task), and a
`tool_answer` function the reply's tool calls: it returns OpenAI-form calls (`function.name`,
`function.arguments` as a string or a JSON value; `id` and `type` are filled in) or None, and
then the text answers. Scripted calls come without content, streamed and not.
Every request seen is kept in `requests` (method, path, headers, body) for assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

AnswerFn = Callable[[dict[str, Any]], str]
ToolAnswerFn = Callable[[dict[str, Any]], list[dict[str, Any]] | None]


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    prompt = body.get("prompt") or body.get("input")
    return prompt if isinstance(prompt, str) else ""


def _count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def _count_call_tokens(calls: list[dict[str, Any]]) -> int:
    """Compact JSON has no spaces to count: ~3 characters a token, as tokenizers split it."""
    return sum(1 + len(c["function"]["name"] + c["function"]["arguments"]) // 3 for c in calls)


def _openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scripted calls in the wire form: an id, type function, arguments as a JSON string."""
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        out.append(
            {
                "id": call.get("id") or f"call_fake_{i}",
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


def _error(status: int, message: str, retry_after: str = "1") -> web.Response:
    kind = (
        "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": f"fake_{status}"}}
    headers = {"retry-after": retry_after} if status in (429, 503) else {}
    return web.json_response(body, status=status, headers=headers)


def _scripted_error(model: str) -> web.Response:
    """`error-<status>` or `error-<status>-<retry after s>`."""
    parts = model.split("-")
    return _error(int(parts[1]), f"scripted failure for {model}", *parts[2:3])


def _refused_like_openai(body: dict[str, Any]) -> web.Response | None:
    """The 400s the real API gives for requests it will not take, so a gateway bug that
    sends one shows in tests as it would in production."""
    if body.get("stream_options") is not None and not body.get("stream"):
        return _invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        )
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return _invalid("'messages' must be a non-empty array.", "messages")
    return None


def _invalid(message: str, param: str) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return web.json_response({"error": error}, status=400)


async def _trickle_forever(request: web.Request) -> web.StreamResponse:
    """A 200 JSON answer whose body starts and never ends."""
    response = web.StreamResponse(headers={"content-type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"choices": [')
    while True:
        await response.write(b" ")
        await asyncio.sleep(0.01)


async def _stalled(request: web.Request, payload: bytes, delay_ms: int) -> web.StreamResponse:
    """Send the headers at once and the answer `delay_ms` later."""
    response = web.StreamResponse(headers={"content-type": "application/json"})
    await response.prepare(request)
    await asyncio.sleep(delay_ms / 1000)
    await response.write(payload)
    await response.write_eof()
    return response


async def _cut_whole(request: web.Request, payload: bytes) -> web.StreamResponse:
    """Declare the whole answer's length, send half of it, drop the connection."""
    response = web.StreamResponse(headers={"content-type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    assert request.transport is not None
    request.transport.close()
    return response


@dataclass
class FakeCloud:
    answer: AnswerFn | None = None
    tool_answer: ToolAnswerFn | None = None
    requests: list[SeenRequest] = field(default_factory=list)
    record: bool = True
    # Per-model counts of failures still to inject, for `flaky-N` style tests.
    failures: dict[str, int] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def _seen(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        raw = await request.read()
        if self.record:
            self.requests.append(
                SeenRequest(
                    request.method, request.path, request.query_string, CIMultiDict(request.headers), raw
                )
            )
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = {}
        return raw, body if isinstance(body, dict) else {}

    async def _misbehave(self, request: web.Request, model: str) -> web.StreamResponse | None:
        """Apply the model-name behaviours that are not about the answer's content."""
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-")[1].split(":")[0]) / 1000)
        if model.startswith("error-"):
            return _scripted_error(model)
        if model in self.failures and self.failures[model] > 0:
            self.failures[model] -= 1
            return _error(503, "scripted transient failure")
        if model == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if model == "garbage":
            return web.Response(body=b'{"choices": [', content_type="application/json")
        if model == "html":
            return web.Response(
                body=b"<html><body>Sign in to continue</body></html>", content_type="text/html"
            )
        return None

    def _text_for(self, body: dict[str, Any], model: str) -> str:
        if self.answer is not None:
            return self.answer(body)
        if model.startswith("json"):
            return orjson.dumps({"answer": _last_user_text(body), "ok": True}).decode()
        if model.startswith("huge-"):
            return "x" * int(model.split("-")[1])
        return f"echo: {_last_user_text(body)}"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        _, body = await self._seen(request)
        model = str(body.get("model", ""))
        refused = _refused_like_openai(body)
        if refused is not None:
            return refused
        failure = await self._misbehave(request, model)
        if failure is not None:
            return failure
        scripted = self._scripted_calls(body)
        text = "" if scripted else self._text_for(body, model)
        tool_call = self._tool_call(body) if model.startswith("tool") and not scripted else None
        calls = scripted or ([tool_call] if tool_call else [])
        finish = "length" if model.startswith("length") else "tool_calls" if calls else "stop"
        usage = {
            "prompt_tokens": _count_tokens(orjson.dumps(body.get("messages", [])).decode()),
            "completion_tokens": _count_call_tokens(scripted) if scripted else _count_tokens(text),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            return await self._stream_chat(request, body, model, text, calls, finish, usage)
        if model == "endless":
            return await _trickle_forever(request)
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
        if calls:
            message["tool_calls"] = calls
        choices = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            for i in range(int(body.get("n") or 1))
        ]
        answer = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }
        if model == "cut":
            return await _cut_whole(request, orjson.dumps(answer))
        if model.startswith("stall-"):
            return await _stalled(request, orjson.dumps(answer), int(model.split("-")[1]))
        return web.json_response(
            answer,
            dumps=lambda o: orjson.dumps(o).decode(),
            headers={"x-request-id": "upstream-req-1", "openai-processing-ms": "1"},
        )

    def _scripted_calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The `tool_answer` function's calls for this request (none: the text answers)."""
        calls = self.tool_answer(body) if self.tool_answer is not None else None
        return _openai_calls(calls) if calls else []

    @staticmethod
    def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
        tools = body.get("tools") or []
        if not tools:
            return None
        name = tools[0].get("function", {}).get("name", "tool")
        arguments = orjson.dumps({"query": _last_user_text(body)}).decode()
        return {"id": "call_fake", "type": "function", "function": {"name": name, "arguments": arguments}}

    async def _stream_chat(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        text: str,
        calls: list[dict[str, Any]],
        finish: str,
        usage: dict[str, Any],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        async def emit(choices: list[dict[str, Any]], **extra: Any) -> None:
            await response.write(b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n")

        if model.startswith("stall-"):
            await asyncio.sleep(int(model.split("-")[1]) / 1000)
        await emit([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for index, call in enumerate(calls):
            first = {**call, "index": index, "function": {"name": call["function"]["name"], "arguments": ""}}
            await emit([{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}])
            arguments = call["function"]["arguments"]
            for part in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                delta = {"tool_calls": [{"index": index, "function": {"arguments": part}}]}
                await emit([{"index": 0, "delta": delta}])
        words = text.split(" ") if text or not calls else []
        for i, word in enumerate(words):
            if model == "cut" and i == len(words) // 2:
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "garbage-stream" and i == len(words) // 2:
                await response.write(b'data: {"choices": [{"delta": \n\n')
            await emit(
                [{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "finish_reason": None}]
            )
        more = " " + "x" * int(model.split("-")[1]) if model.startswith("endless-") else " more"
        while model.startswith("endless"):
            await emit([{"index": 0, "delta": {"content": more}, "finish_reason": None}])
            await asyncio.sleep(0.01)
        await emit([{"index": 0, "delta": {}, "finish_reason": finish}])
        if (body.get("stream_options") or {}).get("include_usage"):
            await emit([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        _, body = await self._seen(request)
        model = str(body.get("model", ""))
        failure = await self._misbehave(request, model)
        if failure is not None:
            return failure
        text = self._text_for(body, model)
        usage = {
            "prompt_tokens": _count_tokens(str(body.get("prompt", ""))),
            "completion_tokens": _count_tokens(text),
        }
        if not body.get("stream"):
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "created": 0,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(text.split(" ")):
            chunk = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "text": word if i == 0 else " " + word, "finish_reason": None}],
            }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        last = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
            "usage": usage,
        }
        await response.write(b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        _, body = await self._seen(request)
        failure = await self._misbehave(request, str(body.get("model", "")))
        if failure is not None:
            return failure
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": self._vector(str(x))}
            for i, x in enumerate(items)
        ]
        tokens = sum(_count_tokens(str(x)) for x in items)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @staticmethod
    def _vector(text: str, dims: int = 8) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        return [round(b / 255, 4) for b in digest[:dims]]

    async def responses(self, request: web.Request) -> web.StreamResponse:
        _, body = await self._seen(request)
        model = str(body.get("model", ""))
        failure = await self._misbehave(request, model)
        if failure is not None:
            return failure
        text = self._text_for(body, model)
        result = {
            "id": "resp_fake",
            "object": "response",
            "created_at": 0,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_fake",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": _count_tokens(_last_user_text(body)),
                "output_tokens": _count_tokens(text),
                "total_tokens": 0,
            },
        }
        if not body.get("stream"):
            return web.json_response(result)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {**result, "status": "in_progress", "output": []}},
            *(
                {
                    "type": "response.output_text.delta",
                    "delta": w,
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                }
                for w in text.split(" ")
            ),
            {"type": "response.completed", "response": result},
        ]
        for seq, event in enumerate(events):
            event["sequence_number"] = seq
            await response.write(
                f"event: {event['type']}\n".encode() + b"data: " + orjson.dumps(event) + b"\n\n"
            )
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.StreamResponse:
        await self._seen(request)
        names = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names],
            }
        )

    async def echo(self, request: web.Request) -> web.StreamResponse:
        raw, _ = await self._seen(request)
        return web.json_response(
            {
                "path": request.path,
                "method": request.method,
                "query": request.query_string,
                "body": raw.decode("utf-8", "replace"),
            }
        )


class FakeCloudServer:
    """Runs a FakeCloud on a real loopback socket in a background thread."""

    def __init__(self, cloud: FakeCloud | None = None, host: str = "127.0.0.1", port: int = 0):
        self.cloud = cloud or FakeCloud()
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeCloudServer:
        self._thread = threading.Thread(target=self._run, name="fake-cloud", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake cloud did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._shutdown())
        self._loop.close()

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.cloud.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the scripted fake cloud (tests, benchmarks).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(FakeCloud(record=False).app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
