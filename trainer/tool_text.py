"""Tools and tool calls written as plain text, for chat templates that do not know tools.

The convention is Hermes/Qwen's, which common tool-call parsers (vLLM's `hermes`) read: the
function signatures go into the system prompt inside `<tools></tools>`, each call the model
makes is `<tool_call>\\n{"name":...,"arguments":{...}}\\n</tool_call>`, and each tool result
comes back as a user turn inside `<tool_response></tool_response>`.

Training renders answers with these functions and the local backend parses generated text
with `parse_tool_calls`, so what the model learns to write is exactly what is read back.
JSON is compact (no spaces, non-ASCII kept): fewer tokens, and one spelling to learn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

# Short on purpose: with a 2k-token context on a CPU every prompt token costs, and a tuned
# adapter learns the form from its examples more than from the instructions.
TOOLS_PREAMBLE = "# Tools\n\nYou may call functions. Their signatures:\n<tools>\n"
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each call, answer with "
    f'{TOOL_CALL_OPEN}\n{{"name":<function-name>,"arguments":<args-json-object>}}\n{TOOL_CALL_CLOSE}'
)

# A block runs to its closing tag or, for the last one, to the end of the text: a model that
# stops right after the JSON has still made its call (the JSON must parse either way).
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def arguments_value(raw: Any) -> Any:
    """OpenAI's arguments string as the JSON value it holds (kept as is when it is not JSON)."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def tools_text(tools: list[Any]) -> str:
    """The system-prompt block that offers `tools` (OpenAI tool definitions), one per line."""
    lines = [compact_json(tool.get("function", tool) if isinstance(tool, dict) else tool) for tool in tools]
    return TOOLS_PREAMBLE + "\n".join(lines) + TOOLS_POSTAMBLE


def call_prefix(name: str | None = None) -> str:
    """The start of a call block: what a constrained answer is primed with. With `name`, the
    text runs up to where the arguments object begins."""
    prefix = f"{TOOL_CALL_OPEN}\n"
    if name is None:
        return prefix
    return prefix + '{"name":' + compact_json(name) + ',"arguments":'


def call_text(name: str, arguments: Any) -> str:
    """One call block; it starts with `call_prefix(name)`, so a primed answer reads the same."""
    return call_prefix(name) + compact_json(arguments) + "}\n" + TOOL_CALL_CLOSE


def tool_calls_text(calls: list[dict[str, Any]]) -> str:
    """OpenAI-form `tool_calls` as call blocks, one per line."""
    return "\n".join(
        call_text(call["function"]["name"], arguments_value(call["function"].get("arguments", "{}")))
        for call in calls
    )


def tool_response_text(content: str) -> str:
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, compact


@dataclass(frozen=True)
class ParsedAnswer:
    """Generated text read as tool calls: the text before the first block, and the calls."""

    content: str | None
    calls: list[ParsedCall]


def tool_call_start(text: str) -> int:
    """Where the first call block begins in `text`, or -1."""
    return text.find(TOOL_CALL_OPEN)


def parse_tool_calls(text: str, tool_names: Collection[str]) -> ParsedAnswer | None:
    """The calls written in `text`, or None when it has none or any block is malformed (not
    a JSON object, a name not among `tool_names`, arguments that are not an object): the
    caller then answers with the text as it is. Text after the last block is dropped."""
    start = tool_call_start(text)
    if start < 0:
        return None
    calls = []
    for block in _BLOCK.finditer(text, start):
        call = _parse_block(block.group(1), tool_names)
        if call is None:
            return None
        calls.append(call)
    return ParsedAnswer(text[:start].rstrip() or None, calls)


def _parse_block(body: str, tool_names: Collection[str]) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    name, arguments = value.get("name"), arguments_value(value.get("arguments", {}))
    if not isinstance(name, str) or name not in tool_names or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, compact_json(arguments))
