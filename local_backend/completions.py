"""`/v1/completions` (legacy text completion): raw prompts, no chat template.

Several prompts in one request become one job whose sequences are batched together;
choice `i * n + j` is the j-th completion of prompt i, as OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from local_backend.engine import Engine
from local_backend.errors import InvalidRequest
from local_backend.jobs import (
    GenerationJob,
    JobFailed,
    SequenceResult,
    SequenceSpec,
    TextDelta,
    cancel_unless_finished,
)
from local_backend.schemas import CompletionChoice, CompletionRequest, CompletionResponse
from local_backend.serving import (
    SSE_DONE,
    max_tokens_for,
    new_id,
    now,
    response_format_grammar,
    sampling_params,
    sse,
    sse_error,
    usage_of,
)


@dataclass
class CompletionPlan:
    request: CompletionRequest
    prompt_texts: list[str]
    prompt_tokens: int
    job: GenerationJob
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=now)


def plan_completion(engine: Engine, request: CompletionRequest) -> CompletionPlan:
    """Tokenize the prompts and compile the constraint of a completion request. Blocking."""
    engine.check_model(request.model)
    if request.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    prompts = _prompt_ids(engine, request.prompt)
    grammar = response_format_grammar(engine, request.response_format)
    sequences = []
    for ids in prompts:
        max_tokens = max_tokens_for(len(ids), request.max_tokens, engine)
        for j in range(request.n):
            seed = None if request.seed is None else request.seed + j
            sequences.append(SequenceSpec(ids, max_tokens, seed))
    job = GenerationJob(sequences, sampling_params(request), request.model, grammar=grammar)
    texts = [engine.tokenizer.decode(ids) for ids in prompts] if request.echo else []
    return CompletionPlan(request, texts, sum(len(ids) for ids in prompts), job)


def _prompt_ids(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts: list[list[int]] = [engine.encode_text(prompt)]
    elif not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    elif all(isinstance(p, str) for p in prompt):
        prompts = [engine.encode_text(str(p)) for p in prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [[int(t) for t in prompt]]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
    vocab = len(engine.tokenizer)
    for ids in prompts:
        if not ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return prompts


def completion_response(plan: CompletionPlan, results: list[SequenceResult]) -> CompletionResponse:
    choices = [
        CompletionChoice(index=i, text=_echo(plan, i) + r.text, finish_reason=r.finish_reason)
        for i, r in enumerate(results)
    ]
    return CompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.request.model,
        choices=choices,
        usage=usage_of(plan.prompt_tokens, results),
    )


def _echo(plan: CompletionPlan, choice: int) -> str:
    return plan.prompt_texts[choice // plan.request.n] if plan.prompt_texts else ""


def completion_stream(plan: CompletionPlan) -> AsyncIterator[bytes]:
    """Text-completion chunks; cancels the job if the client stops reading."""
    return cancel_unless_finished(plan.job, _chunks(plan))


async def _chunks(plan: CompletionPlan) -> AsyncIterator[bytes]:
    options = plan.request.stream_options
    include_usage = bool(options and options.include_usage)
    for i in range(len(plan.job.sequences)) if plan.prompt_texts else ():
        yield _chunk(plan, i, _echo(plan, i), None, include_usage)
    completion_tokens = 0
    async for event in plan.job.events():
        if isinstance(event, JobFailed):
            yield sse_error(event.error)
            yield SSE_DONE
            return
        if isinstance(event, TextDelta):
            yield _chunk(plan, event.index, event.text, None, include_usage)
        else:
            completion_tokens += event.completion_tokens
            yield _chunk(plan, event.index, "", event.finish_reason, include_usage)
    if include_usage:
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
        }
        yield sse(_payload(plan, [], include_usage, usage))
    yield SSE_DONE


def _chunk(plan: CompletionPlan, index: int, text: str, reason: str | None, include_usage: bool) -> bytes:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return sse(_payload(plan, [choice], include_usage))


def _payload(
    plan: CompletionPlan,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": plan.request.model,
        "choices": choices,
    }
    if include_usage:
        payload["usage"] = usage
    return payload
