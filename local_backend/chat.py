"""`/v1/chat/completions`: a request becomes a job (template, tokens, grammar), and the
job's results become OpenAI's response or its stream of chunks.

Prompts are rendered by the trainer's own code (`trainer.chat_format.template_inputs`), so a
served adapter reads the text it was trained on; `local_backend.tool_calls` says how tools
shape the generation and how calls are read back out of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from local_backend.constrained import Grammar
from local_backend.engine import Engine
from local_backend.errors import InvalidRequest, InvalidSchema
from local_backend.jobs import (
    GenerationJob,
    JobFailed,
    SequenceFinished,
    SequenceResult,
    SequenceSpec,
    TextDelta,
    cancel_unless_finished,
)
from local_backend.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ResponseFunctionCall,
    ResponseToolCall,
)
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
from local_backend.tool_calls import (
    ContentGate,
    ToolPlan,
    call_chunk_deltas,
    new_call_id,
    plan_tools,
    read_answer,
    response_calls,
)
from trainer.chat_format import template_inputs
from trainer.dataset import SkipSample, normalize_message


@dataclass
class ChatPlan:
    """A chat request turned into a job, with what shaping its answer needs."""

    request: ChatCompletionRequest
    prompt_tokens: int
    job: GenerationJob
    tools: ToolPlan = field(default_factory=ToolPlan)
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)
    call_ids: list[str] = field(default_factory=list)


def plan_chat(engine: Engine, request: ChatCompletionRequest) -> ChatPlan:
    """Template, tokenize and compile the constraint of a chat request. Blocking."""
    engine.check_model(request.model)
    tools = plan_tools(request)
    prompt_ids = encode_prompt(engine, request, tools.answer_prefix)
    max_tokens = max_tokens_for(len(prompt_ids), request.requested_max_tokens, engine)
    grammar: Grammar | None
    if tools.schema is not None:
        grammar = _tool_grammar(engine, tools.schema)
    else:
        grammar = response_format_grammar(engine, request.response_format)
    seed = request.seed
    sequences = [
        SequenceSpec(prompt_ids, max_tokens, None if seed is None else seed + i) for i in range(request.n)
    ]
    job = GenerationJob(sequences, sampling_params(request), request.model, grammar=grammar)
    call_ids = [new_call_id() for _ in range(request.n)]
    return ChatPlan(request, len(prompt_ids), job, tools, call_ids=call_ids)


def encode_prompt(engine: Engine, request: ChatCompletionRequest, answer_prefix: str = "") -> list[int]:
    """Prompt token ids: the chat as the trainer renders it, then the text the answer is
    primed with (tokenized on its own: it starts a new word after the template's newline)."""
    messages, tools = prompt_inputs(engine.tokenizer, request)
    ids = engine.encode_chat(messages, tools)
    if answer_prefix:
        ids += engine.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return ids


def prompt_inputs(
    tokenizer: Any, request: ChatCompletionRequest
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """(messages, tools) for the chat template, through the trainer's rendering."""
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
    return template_inputs(tokenizer, chat_messages(request.messages), tools)


def _tool_grammar(engine: Engine, schema: dict[str, Any]) -> Grammar:
    try:
        return engine.grammar(schema)
    except InvalidSchema as exc:
        exc.param = "tools"
        raise


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Request messages in the trainer's normal form: developer → system, text parts joined,
    tool calls and results in OpenAI form."""
    normalized = []
    for message in messages:
        try:
            normalized.append(normalize_message(message.model_dump(exclude_none=True)))
        except SkipSample as exc:
            raise InvalidRequest(_unsupported(message), param="messages") from exc
    return normalized


def _unsupported(message: ChatMessage) -> str:
    parts = message.content if isinstance(message.content, list) else []
    kinds = [part.type for part in parts if part.type != "text"]
    if kinds:
        return f"content parts of type '{kinds[0]}' are not supported"
    return f"a '{message.role}' message this model cannot read"


# ---------------------------------------------------------------- one response


def chat_response(plan: ChatPlan, results: list[SequenceResult]) -> ChatCompletionResponse:
    choices = [_choice(plan, i, result) for i, result in enumerate(results)]
    return ChatCompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.request.model,
        choices=choices,
        usage=usage_of(plan.prompt_tokens, results),
    )


def _choice(plan: ChatPlan, index: int, result: SequenceResult) -> ChatChoice:
    message, reason = _answer(plan, index, result.text, result.finish_reason)
    return ChatChoice(index=index, message=message, finish_reason=reason)


def _answer(plan: ChatPlan, index: int, text: str, reason: str | None) -> tuple[AssistantMessage, str | None]:
    forced = plan.tools.forced_function
    if forced is not None:
        function = ResponseFunctionCall(name=forced, arguments=text)
        call = ResponseToolCall(id=plan.call_ids[index], function=function)
        return AssistantMessage(content=None, tool_calls=[call]), reason
    parsed = read_answer(plan.tools, text)
    if parsed is None:
        return AssistantMessage(content=text), reason
    return AssistantMessage(content=parsed.content, tool_calls=response_calls(parsed)), "tool_calls"


# ---------------------------------------------------------------- streaming


def chat_stream(plan: ChatPlan) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream for `plan`; cancels the job if the client stops reading."""
    return cancel_unless_finished(plan.job, _chunks(plan))


async def _chunks(plan: ChatPlan) -> AsyncIterator[bytes]:
    stream_options = plan.request.stream_options
    include_usage = bool(stream_options and stream_options.include_usage)
    for index in range(plan.request.n):
        yield _chunk(plan, [_choice_delta(index, _opening_delta(plan, index))], include_usage)
    gates = [ContentGate(hold_everything=plan.tools.required) for _ in range(plan.request.n)]
    completion_tokens = 0
    async for event in plan.job.events():
        if isinstance(event, JobFailed):
            yield sse_error(event.error)
            yield SSE_DONE
            return
        if isinstance(event, TextDelta):
            delta = _text_delta(plan, event, gates[event.index])
            if delta is not None:
                yield _chunk(plan, [_choice_delta(event.index, delta)], include_usage)
            continue
        completion_tokens += event.completion_tokens
        for chunk in _closing_chunks(plan, event, gates[event.index], include_usage):
            yield chunk
    if include_usage:
        yield _chunk(plan, [], include_usage, _usage(plan.prompt_tokens, completion_tokens))
    yield SSE_DONE


def _opening_delta(plan: ChatPlan, index: int) -> dict[str, Any]:
    forced = plan.tools.forced_function
    if forced is None:
        # Null while the answer may still turn out to be calls, as OpenAI streams them.
        return {"role": "assistant", "content": None if plan.tools.reads_calls else ""}
    call = {
        "index": 0,
        "id": plan.call_ids[index],
        "type": "function",
        "function": {"name": forced, "arguments": ""},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _text_delta(plan: ChatPlan, event: TextDelta, gate: ContentGate) -> dict[str, Any] | None:
    if plan.tools.forced_function is not None:
        return {"tool_calls": [{"index": 0, "function": {"arguments": event.text}}]}
    if not plan.tools.reads_calls:
        return {"content": event.text}
    shown = gate.feed(event.text)
    return {"content": shown} if shown else None


def _closing_chunks(
    plan: ChatPlan, event: SequenceFinished, gate: ContentGate, include_usage: bool
) -> list[bytes]:
    reason = event.finish_reason
    deltas: list[dict[str, Any]] = []
    if plan.tools.reads_calls:
        # Read the whole text once, as the non-stream answer does: the two always agree.
        parsed = read_answer(plan.tools, gate.text)
        if parsed is None:
            rest = gate.rest()
            deltas = [{"content": rest}] if rest else []
        else:
            deltas, reason = call_chunk_deltas(parsed), "tool_calls"
    chunks = [_chunk(plan, [_choice_delta(event.index, delta)], include_usage) for delta in deltas]
    chunks.append(_chunk(plan, [_choice_delta(event.index, {}, reason)], include_usage))
    return chunks


def _choice_delta(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _chunk(
    plan: ChatPlan, choices: list[dict[str, Any]], include_usage: bool, usage: dict[str, int] | None = None
) -> bytes:
    payload: dict[str, Any] = {
        "id": plan.id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": plan.request.model,
        "choices": choices,
    }
    if include_usage:
        payload["usage"] = usage
    return sse(payload)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
