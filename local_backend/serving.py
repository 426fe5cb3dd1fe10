"""What chat and legacy completions share: sampling parameters, the context-length check,
structured-output grammars, SSE framing, and waiting for a job while watching the client."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request

from local_backend.constrained import ANY_JSON_OBJECT, Grammar
from local_backend.engine import Engine
from local_backend.errors import BackendError, ContextLengthExceeded, InvalidRequest
from local_backend.jobs import GenerationJob, SequenceResult
from local_backend.sampling import SamplingParams
from local_backend.schemas import ResponseFormat, SamplingFields, Usage

SSE_DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sampling_params(request: SamplingFields) -> SamplingParams:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        stop=tuple(stop),
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=_logit_bias(request.logit_bias),
    )


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    try:
        return {int(token): max(-100.0, min(100.0, float(bias))) for token, bias in (raw or {}).items()}
    except ValueError as exc:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from exc


def max_tokens_for(prompt_len: int, requested: int | None, engine: Engine) -> int:
    """How many tokens a sequence may generate; 400 when the prompt or request overflows."""
    limit = engine.max_model_len
    if prompt_len >= limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten it.",
            param="messages",
        )
    room = limit - prompt_len
    if requested is None:
        default = engine.settings.default_max_tokens
        return min(room, default) if default else room
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="max_tokens",
        )
    return requested


def response_format_grammar(engine: Engine, response_format: ResponseFormat | None) -> Grammar | None:
    """The grammar enforcing `response_format`, or None for plain text. Blocking."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return engine.grammar(ANY_JSON_OBJECT)
    spec = response_format.json_schema
    if spec is None:
        raise InvalidRequest("response_format json_schema needs a json_schema", param="response_format")
    return engine.grammar(spec.json_schema or {})


def usage_of(prompt_tokens: int, results: list[SequenceResult]) -> Usage:
    """Usage of a finished (non-streamed) response: real token counts of every sequence."""
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_error(error: BackendError) -> bytes:
    return sse(error.body())


async def collect_unless_disconnected(request: Request, job: GenerationJob) -> list[SequenceResult] | None:
    """Wait for the job's results; None (and the job cancelled) if the client hangs up first."""
    collector = asyncio.ensure_future(job.collect())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            job.cancel()
            collector.cancel()
    return collector.result() if not collector.cancelled() else None


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
