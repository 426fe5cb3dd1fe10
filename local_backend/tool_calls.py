"""How a chat request's tools shape its generation and its answer.

The prompt always shows the tools the way the adapter was trained (`trainer.chat_format`),
and answers are read back with the same convention (`trainer.tool_text`):

- `tool_choice` naming a function: the answer is primed with the trained call's text up to
  its arguments and constrained to the function's parameters; the generated text is the
  arguments. finish_reason "stop", as OpenAI answers a forced function.
- "required": primed with `<tool_call>\\n` and constrained to `{"name","arguments"}` of one of
  the tools; read like free text. finish_reason "tool_calls".
- "auto", or tools without a `tool_choice`: free generation; `<tool_call>` blocks in the text
  become `tool_calls` (finish_reason "tool_calls"), a text without blocks is the answer, and
  a malformed block leaves the whole text as the answer.
- "none": the tools are in the prompt (as in training), the answer is text.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from local_backend.errors import InvalidRequest
from local_backend.schemas import (
    ChatCompletionRequest,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseToolCall,
    Tool,
)
from trainer.tool_text import TOOL_CALL_OPEN, ParsedAnswer, call_prefix, parse_tool_calls, tool_call_start

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of one generation."""

    forced_function: str | None = None
    required: bool = False
    # Functions a generated call may name; empty when calls are not read from the text.
    callable_names: frozenset[str] = frozenset()
    schema: dict[str, Any] | None = None
    single_call: bool = False  # parallel_tool_calls false: at most one call per answer

    @property
    def answer_prefix(self) -> str:
        """Text the answer is primed with, already part of the prompt."""
        if self.forced_function is not None:
            return call_prefix(self.forced_function)
        return call_prefix() if self.required else ""

    @property
    def reads_calls(self) -> bool:
        """Whether calls are parsed out of the generated text (auto and required)."""
        return bool(self.callable_names) and self.forced_function is None


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    """The tool plan of a request; InvalidRequest when its tool_choice cannot be met."""
    choice, tools = request.tool_choice, request.tools or []
    if choice == "none":
        return ToolPlan()
    single = request.parallel_tool_calls is False
    if choice is None or choice == "auto":
        return ToolPlan(callable_names=frozenset(tool.function.name for tool in tools), single_call=single)
    if not tools:
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        tool = _find_tool(tools, choice.function.name)
        return ToolPlan(
            forced_function=tool.function.name, schema=tool.function.parameters or _EMPTY_PARAMETERS
        )
    names = frozenset(tool.function.name for tool in tools)
    schema = {"anyOf": [_named_call_schema(t) for t in tools]}
    return ToolPlan(required=True, callable_names=names, schema=schema, single_call=single)


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


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def read_answer(plan: ToolPlan, text: str) -> ParsedAnswer | None:
    """The calls in a generated text (the primed prefix included), or None: answer with text."""
    if not plan.reads_calls:
        return None
    answer = parse_tool_calls(plan.answer_prefix + text, plan.callable_names)
    if answer is not None and plan.single_call:
        return ParsedAnswer(answer.content, answer.calls[:1])
    return answer


def response_calls(answer: ParsedAnswer) -> list[ResponseToolCall]:
    return [
        ResponseToolCall(
            id=new_call_id(), function=ResponseFunctionCall(name=call.name, arguments=call.arguments)
        )
        for call in answer.calls
    ]


def call_chunk_deltas(answer: ParsedAnswer) -> list[dict[str, Any]]:
    """OpenAI's streamed form of the calls: per call, one delta that opens it (index, id,
    type, name) and one that carries its arguments."""
    deltas = []
    for index, call in enumerate(response_calls(answer)):
        opening = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.function.name, "arguments": ""},
        }
        deltas.append({"tool_calls": [opening]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.function.arguments}}]})
    return deltas


class ContentGate:
    """One choice's text while it streams with tools on offer: content passes through until a
    call block may be starting; from there the text is held until the sequence ends, when the
    whole of it is parsed (so the stream says exactly what the non-stream answer says, and a
    malformed block can still go out as plain text). Whitespace before a block is held too:
    the parsed answer's content drops it."""

    def __init__(self, hold_everything: bool = False) -> None:
        self.text = ""
        self._shown = 0
        self._hold_everything = hold_everything

    def feed(self, delta: str) -> str:
        """Add generated text; return the content that can be shown now."""
        self.text += delta
        if self._hold_everything:
            return ""
        start = tool_call_start(self.text)
        end = start if start >= 0 else len(self.text) - _open_tag_tail(self.text)
        return self._show_until(len(self.text[:end].rstrip()))

    def rest(self) -> str:
        """Everything not shown yet (when the text turned out to be a plain answer)."""
        return self._show_until(len(self.text))

    def _show_until(self, end: int) -> str:
        if end <= self._shown:
            return ""
        shown, self._shown = self.text[self._shown : end], end
        return shown


def _open_tag_tail(text: str) -> int:
    """Length of the longest end of `text` that could still grow into `<tool_call>`."""
    for size in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
