"""`/v1/chat/completions`: a request becomes a job (template, tokens, grammar), and the
job's results become OpenAI's response or its stream of chunks.

Tool calls: with `tool_choice` naming a function, the answer is constrained to that
function's parameters schema and returned as its `tool_calls` (finish_reason "stop", as
OpenAI does for a forced function); with "required", to `{"name", "arguments"}` for one
of the tools (finish_reason "tool_calls"). "auto" and "none" answer in plain text.
"""

from __future__ import annotations

import json
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
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseToolCall,
    Tool,
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

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ChatPlan:
    """A chat request turned into a job, with what shaping its answer needs."""

    request: ChatCompletionRequest
    prompt_tokens: int
    job: GenerationJob
    forced_function: str | None = None
    tool_required: bool = False
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)
    call_ids: list[str] = field(default_factory=list)


def plan_chat(engine: Engine, request: ChatCompletionRequest) -> ChatPlan:
    """Template, tokenize and compile the constraint of a chat request. Blocking."""
    engine.check_model(request.model)
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
    prompt_ids = engine.encode_chat(template_messages(request.messages), tools)
    max_tokens = max_tokens_for(len(prompt_ids), request.requested_max_tokens, engine)
    forced, required, schema = tool_constraint(request)
    grammar: Grammar | None
    if schema is not None:
        grammar = _tool_grammar(engine, schema)
    else:
        grammar = response_format_grammar(engine, request.response_format)
    seed = request.seed
    sequences = [
        SequenceSpec(prompt_ids, max_tokens, None if seed is None else seed + i) for i in range(request.n)
    ]
    job = GenerationJob(sequences, sampling_params(request), request.model, grammar=grammar)
    call_ids = [new_id("call") for _ in range(request.n)]
    return ChatPlan(request, len(prompt_ids), job, forced, required, call_ids=call_ids)


def _tool_grammar(engine: Engine, schema: dict[str, Any]) -> Grammar:
    try:
        return engine.grammar(schema)
    except InvalidSchema as exc:
        exc.param = "tools"
        raise


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: plain-text content, developer → system."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text_content(message),
        }
        if message.tool_calls:
            calls = [call.model_dump(exclude_none=True) for call in message.tool_calls]
            item["tool_calls"] = calls
            # Most small-model templates render only `content`: show them the calls there.
            item["content"] = item["content"] or json.dumps([c["function"] for c in calls])
        if message.name:
            item["name"] = message.name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


def _text_content(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"content parts of type '{part.type}' are not supported", param="messages")
        parts.append(part.text)
    return "\n".join(parts)


def tool_constraint(request: ChatCompletionRequest) -> tuple[str | None, bool, dict[str, Any] | None]:
    """(forced function name, whether some tool call is required, schema to enforce)."""
    choice = request.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None, False, None
    tools = request.tools or []
    if not tools:
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        tool = _find_tool(tools, choice.function.name)
        return tool.function.name, False, tool.function.parameters or _EMPTY_PARAMETERS
    return None, True, {"anyOf": [_named_call_schema(tool) for tool in tools]}


def _find_tool(tools: list[Tool], name: str) -> Tool:
    for tool in tools:
        if tool.function.name == name:
            return tool
    raise InvalidRequest(f"tool_choice names '{name}', which is not among the tools", param="tool_choice")


def _named_call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or _EMPTY_PARAMETERS,
        },
        "required": ["name", "arguments"],
    }


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
    reason = result.finish_reason
    call = _tool_call(plan, index, result.text)
    if call is None:
        message = AssistantMessage(content=result.text)
    else:
        message = AssistantMessage(content=None, tool_calls=[call])
        if plan.tool_required and reason == "stop":
            reason = "tool_calls"
    return ChatChoice(index=index, message=message, finish_reason=reason)


def _tool_call(plan: ChatPlan, index: int, text: str) -> ResponseToolCall | None:
    if plan.forced_function is not None:
        function = ResponseFunctionCall(name=plan.forced_function, arguments=text)
    elif plan.tool_required:
        parsed = _parse_named_call(text)
        if parsed is None:
            return None
        function = ResponseFunctionCall(name=parsed[0], arguments=parsed[1])
    else:
        return None
    return ResponseToolCall(id=plan.call_ids[index], function=function)


def _parse_named_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete `{"name", "arguments"}` answer, else None."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or "name" not in call:
        return None
    return str(call["name"]), json.dumps(call.get("arguments", {}))


# ---------------------------------------------------------------- streaming


def chat_stream(plan: ChatPlan) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream for `plan`; cancels the job if the client stops reading."""
    return cancel_unless_finished(plan.job, _chunks(plan))


async def _chunks(plan: ChatPlan) -> AsyncIterator[bytes]:
    stream_options = plan.request.stream_options
    include_usage = bool(stream_options and stream_options.include_usage)
    for index in range(plan.request.n):
        yield _chunk(plan, [_choice_delta(index, _opening_delta(plan, index))], include_usage)
    buffered = [""] * plan.request.n
    completion_tokens = 0
    async for event in plan.job.events():
        if isinstance(event, JobFailed):
            yield sse_error(event.error)
            yield SSE_DONE
            return
        if isinstance(event, TextDelta):
            delta = _text_delta(plan, event, buffered)
            if delta is not None:
                yield _chunk(plan, [_choice_delta(event.index, delta)], include_usage)
            continue
        completion_tokens += event.completion_tokens
        for chunk in _closing_chunks(plan, event, buffered[event.index], include_usage):
            yield chunk
    if include_usage:
        yield _chunk(plan, [], include_usage, _usage(plan.prompt_tokens, completion_tokens))
    yield SSE_DONE


def _opening_delta(plan: ChatPlan, index: int) -> dict[str, Any]:
    if plan.forced_function is None:
        return {"role": "assistant", "content": None if plan.tool_required else ""}
    call = {
        "index": 0,
        "id": plan.call_ids[index],
        "type": "function",
        "function": {"name": plan.forced_function, "arguments": ""},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _text_delta(plan: ChatPlan, event: TextDelta, buffered: list[str]) -> dict[str, Any] | None:
    if plan.tool_required:
        # The function's name is only known once the whole call is generated.
        buffered[event.index] += event.text
        return None
    if plan.forced_function is not None:
        return {"tool_calls": [{"index": 0, "function": {"arguments": event.text}}]}
    return {"content": event.text}


def _closing_chunks(
    plan: ChatPlan, event: SequenceFinished, buffered: str, include_usage: bool
) -> list[bytes]:
    chunks = []
    reason = event.finish_reason
    if plan.tool_required:
        call = _tool_call(plan, event.index, buffered)
        if call is None:
            delta: dict[str, Any] = {"content": buffered}
        else:
            delta = {"tool_calls": [{"index": 0, **call.model_dump()}]}
            reason = "tool_calls" if reason == "stop" else reason
        chunks.append(_chunk(plan, [_choice_delta(event.index, delta)], include_usage))
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
