"""The Hermes tool-call text: what training writes is what parsing reads back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trainer.tool_text import (
    ParsedAnswer,
    ParsedCall,
    call_prefix,
    call_text,
    parse_tool_calls,
    tool_calls_text,
    tools_text,
)

NAMES = {"add", "ping"}


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def test_calls_are_one_compact_line_each_and_parse_back() -> None:
    calls = [openai_call("add", {"a": 2, "b": "é"}), openai_call("ping", {})]
    text = tool_calls_text(calls)
    assert text == (
        '<tool_call>\n{"name":"add","arguments":{"a":2,"b":"é"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>'
    )
    assert parse_tool_calls(text, NAMES) == ParsedAnswer(
        None, [ParsedCall("add", '{"a":2,"b":"é"}'), ParsedCall("ping", "{}")]
    )


def test_a_primed_answer_reads_like_a_whole_call() -> None:
    assert call_text("add", {"a": 1}).startswith(call_prefix("add"))
    assert call_text("add", {"a": 1}).startswith(call_prefix())
    assert call_prefix("add") + '{"a":1}}\n</tool_call>' == call_text("add", {"a": 1})


def test_tools_block_lists_each_function_on_one_line() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    text = tools_text(tools)
    assert '\n{"name":"add","parameters":{"type":"object"}}\n' in text
    assert "<tools>" in text and "</tools>" in text and "<tool_call>" in text


def test_text_before_the_first_call_is_the_content_and_spaces_are_tolerated() -> None:
    text = 'Let me add.\n<tool_call> { "name": "add", "arguments": {"a": 1} } </tool_call> trailing'
    assert parse_tool_calls(text, NAMES) == ParsedAnswer("Let me add.", [ParsedCall("add", '{"a":1}')])


def test_an_unclosed_last_block_with_complete_json_is_a_call() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name":"ping","arguments":{}}', NAMES)
    assert parsed is not None and parsed.calls == [ParsedCall("ping", "{}")]


def test_arguments_given_as_a_json_string_are_accepted() -> None:
    parsed = parse_tool_calls('<tool_call>{"name":"add","arguments":"{\\"a\\":1}"}</tool_call>', NAMES)
    assert parsed is not None and parsed.calls == [ParsedCall("add", '{"a":1}')]


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name":"rm_rf","arguments":{}}\n</tool_call>',
        '<tool_call>\n{"name":["add"],"arguments":{}}\n</tool_call>',
        '<tool_call>\n{"name":"add","arguments":[1]}\n</tool_call>',
        '<tool_call>\n["add"]\n</tool_call>',
        '<tool_call>\n{"name":"add","arguments":{"a":1}',
        '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>\n<tool_call>\n{"name":"ping"',
    ],
)
def test_no_or_malformed_blocks_parse_to_nothing(text: str) -> None:
    assert parse_tool_calls(text, NAMES) is None
