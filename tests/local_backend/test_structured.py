"""response_format and forced tool calls: constrained decoding makes even a random model's
answers parse and validate."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "member": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "member", "mood", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]
ASK: list[Any] = [{"role": "user", "content": "Describe a person as JSON."}]


def close_quotes_bias(tokenizer: Any) -> dict[str, int]:
    """Favour the tokens that end JSON strings and objects, so a random model finishes."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ['"', "}"]} - {tokenizer.unk_token_id}
    return {str(i): 6 for i in ids}


def test_json_schema_answers_always_validate(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=120,
        temperature=1.0,
        seed=5,
        n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_json_schema_works_on_an_adapter_and_in_a_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="alpha",
        messages=ASK,
        max_tokens=120,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_answers_parse_as_objects(client: openai.OpenAI, tiny_reference: tuple[Any, Any]) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=200,
        temperature=0.8,
        seed=1,
        n=2,
        logit_bias=close_quotes_bias(tiny_reference[1]),
        response_format={"type": "json_object"},
    )
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content or ""), dict)


def test_completions_accept_response_format_too(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model="tiny",
        prompt="person:",
        max_tokens=120,
        temperature=0,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
        },
    )
    jsonschema.validate(json.loads(answer.choices[0].text), PERSON)


def test_forced_function_gives_valid_tool_call(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=80,
        temperature=0.7,
        seed=3,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = answer.choices[0]
    assert choice.message.content is None and choice.finish_reason == "stop"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_forced_function_streams_arguments_like_openai(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Weather?"}],
        "max_tokens": 80,
        "temperature": 0,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    whole = client.chat.completions.create(**args)
    chunks = [c for c in client.chat.completions.create(**args, stream=True) if c.choices]
    first = chunks[0].choices[0].delta
    assert first.tool_calls is not None and first.tool_calls[0].function is not None
    assert first.tool_calls[0].function.name == "get_weather" and first.tool_calls[0].id
    arguments = "".join(
        (c.choices[0].delta.tool_calls[0].function.arguments or "")
        for c in chunks
        if c.choices[0].delta.tool_calls and c.choices[0].delta.tool_calls[0].function
    )
    assert whole.choices[0].message.tool_calls is not None
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments


def test_required_tool_choice_picks_one_of_the_tools(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Do something."}],
        max_tokens=100,
        temperature=0,
        tools=TOOLS,
        tool_choice="required",
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call: Any = choice.message.tool_calls[0]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert call.function.name in schemas
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize(
    ("tools", "tool_choice"),
    [(TOOLS, {"type": "function", "function": {"name": "missing"}}), (None, "required")],
)
def test_tool_choice_that_cannot_be_met_is_a_400(client: openai.OpenAI, tools: Any, tool_choice: Any) -> None:
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=5, tool_choice=tool_choice, **kwargs
        )


def test_unenforceable_schema_is_a_400(client: openai.OpenAI) -> None:
    schema: Any = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny",
            messages=ASK,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert caught.value.status_code == 400
