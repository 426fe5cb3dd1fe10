"""Other providers (Anthropic, Gemini, Bedrock, ...) through litellm's translation.

Imported only when a configured upstream says `provider: litellm`: litellm costs ~2.3 s and
~166 MiB to import and ~6 ms a call, so the OpenAI-compatible hot path never carries it.
Clients still speak OpenAI's API; answers come back in OpenAI's shape, streamed or whole.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.errors import GatewayError, InvalidRequest, NotFound, UpstreamTimeout, UpstreamUnreachable
from gateway.settings import UpstreamSettings
from gateway.upstream.base import UpstreamRequest

# The request fields handed on to litellm: OpenAI's own chat and embeddings parameters.
# litellm reads its control arguments (api_base, base_url, api_key, custom_llm_provider,
# extra_headers, mock_response, ...) from the same keyword arguments, so anything else in a
# client's body is refused: a client must never choose where or as whom the gateway calls,
# nor script the answer that gets logged and trained on.
OPENAI_PARAMS = frozenset(
    {
        "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "modalities", "n",
        "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
        "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier",
        "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
        "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
        # embeddings
        "input", "dimensions", "encoding_format",
    }
)  # fmt: skip
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _import_litellm() -> Any:
    # Must be set before the import, or litellm fetches its price map from the network.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    return litellm


class LiteLLMResponse:
    """An upstream answer built from litellm's result, shaped like an HTTP response."""

    def __init__(self, status: int, body: bytes | None = None, stream: AsyncIterator[Any] | None = None):
        self.status = status
        self._body = body or b""
        self._stream = stream
        self.headers = _SSE if stream is not None else _JSON
        self.content_type = "text/event-stream" if stream is not None else "application/json"

    @property
    def is_event_stream(self) -> bool:
        return self._stream is not None

    async def read(self) -> bytes:
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        assert self._stream is not None
        try:
            async for chunk in self._stream:
                yield b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"
        except Exception as exc:  # litellm raises its own tree; map it like a failed call
            raise translate_litellm_error(exc) from None
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        self._stream = self._stream  # litellm's stream wrapper closes with its client


def translate_litellm_error(exc: Exception) -> GatewayError:
    name = type(exc).__name__
    if "Timeout" in name:
        return UpstreamTimeout(f"upstream timed out ({name})")
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", "") or name)[:500]
    if isinstance(status, int) and 400 <= status < 500:
        error = InvalidRequest(message, code=name)
        error.status = status
        return error
    return UpstreamUnreachable(f"upstream failed ({name}): {message}")


class LiteLLMUpstream:
    def __init__(self, name: str, settings: UpstreamSettings):
        self.name = name
        self.settings = settings
        self.api_key = settings.api_key
        self._litellm: Any = None

    async def start(self) -> None:
        self._litellm = _import_litellm()

    async def close(self) -> None:
        return None

    def _call_args(self, request: UpstreamRequest) -> dict[str, Any]:
        body = request.view.body
        if body is None:
            raise InvalidRequest("this upstream takes JSON requests only")
        unknown = sorted(set(body) - OPENAI_PARAMS)
        if unknown:
            raise InvalidRequest(
                f"unrecognized request argument supplied: {unknown[0][:64]!r}", code="unknown_parameter"
            )
        args = {k: v for k, v in body.items() if k not in ("model", "stream_options")}
        args["model"] = self.settings.model_prefix + str(body.get("model", ""))
        if self.api_key:
            args["api_key"] = self.api_key
        if self.settings.base_url:
            args["api_base"] = self.settings.base_url
        if self.settings.api_version:
            args["api_version"] = self.settings.api_version
        args["timeout"] = self.settings.timeout_s
        if body.get("stream") and (body.get("stream_options") or {}).get("include_usage"):
            args["stream_options"] = {"include_usage": True}
        return args

    async def send(self, request: UpstreamRequest) -> LiteLLMResponse:
        if request.method != "POST" or request.path not in ("/chat/completions", "/embeddings"):
            raise NotFound(f"{request.method} /v1{request.path} is not available for upstream {self.name!r}")
        args = self._call_args(request)
        try:
            if request.path == "/embeddings":
                result = await self._litellm.aembedding(**args)
            else:
                result = await self._litellm.acompletion(**args)
        except Exception as exc:  # litellm raises its own tree; map every failure once, here
            raise translate_litellm_error(exc) from None
        if args.get("stream"):
            return LiteLLMResponse(200, stream=result)
        return LiteLLMResponse(200, body=orjson.dumps(result.model_dump(exclude_none=True)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "provider": "litellm", "model_prefix": self.settings.model_prefix}
