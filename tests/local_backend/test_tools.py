"""Tools on the local backend: the prompt is the trainer's rendering, and `<tool_call>` blocks
in the generated text come back as OpenAI `tool_calls`, streamed and not, read by the openai
SDK. A random model writes no calls, so the reading is driven three ways: scripted text
through the response shaping, a constrained `required` call, and a LoRA adapter trained
(through the trainer's own tokenization) to call a tool."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from local_backend.chat import ChatPlan, chat_response, chat_stream, prompt_inputs
from local_backend.jobs import GenerationJob, SequenceFinished, SequenceResult, SequenceSpec, TextDelta
from local_backend.schemas import ChatCompletionRequest
from local_backend.serving import sampling_params
from local_backend.tool_calls import new_call_id, plan_tools
from tests.local_backend.support import RemoteBackend
from trainer.chat_format import render, tokenize_sample
from trainer.dataset import normalize_sample, record_to_sample

PING: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "ping",
            "description": "Ping a host",
            "parameters": {"type": "object", "properties": {"host": {"type": "string", "maxLength": 8}}},
        },
    }
]
PING_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "ping", "arguments": '{"host": "a.io"}'},
}
MALFORMED = '<tool_call>\n{"name":"nope","arguments":{}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(lively_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lively_model_dir)


# ---------------------------------------------------------------- one rendering


def tool_conversation() -> dict[str, Any]:
    """A request whose history holds a call and its result, answered by the cloud with a call."""
    return {
        "model": "tiny",
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "Is a.io up?"},
            {"role": "assistant", "content": None, "tool_calls": [PING_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "timeout"},
            {"role": "user", "content": [{"type": "text", "text": "Try again"}]},
        ],
        "tools": PING,
        "tool_choice": "auto",
    }


def trained_prompt(tokenizer: Any, body: dict[str, Any]) -> str:
    """The prompt part of what the trainer trains on when the cloud answered `body`."""
    answer = {"role": "assistant", "content": None, "tool_calls": [PING_CALL]}
    record = {
        "backend": "cloud",
        "status": 200,
        "endpoint": "/v1/chat/completions",
        "request": body,
        "response": {"choices": [{"message": answer, "finish_reason": "tool_calls"}]},
    }
    sample = record_to_sample(record)
    prompt = render(tokenizer, sample, upto=len(sample["messages"]) - 1, generation_prompt=True)
    assert render(tokenizer, sample).startswith(prompt)
    return prompt


def served_prompt(tokenizer: Any, body: dict[str, Any]) -> str:
    messages, tools = prompt_inputs(tokenizer, ChatCompletionRequest.model_validate(body))
    return str(
        tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    )


def test_backend_renders_a_tool_chat_exactly_as_the_trainer_does(tokenizer: Any) -> None:
    body = tool_conversation()
    prompt = served_prompt(tokenizer, body)
    assert prompt == trained_prompt(tokenizer, body)
    assert '<tool_call>\n{"name":"ping","arguments":{"host":"a.io"}}\n</tool_call>' in prompt
    assert "<tool_response>\ntimeout\n</tool_response>" in prompt and '{"name":"ping"' in prompt


def test_tool_aware_templates_get_the_same_messages_from_both(lively_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    native = AutoTokenizer.from_pretrained(lively_model_dir)
    native.chat_template = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.arguments | tojson }}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    body = tool_conversation()
    prompt = served_prompt(native, body)
    assert prompt == trained_prompt(native, body)
    assert prompt.startswith("TOOL ping\n") and "<|im_start|>tool\ntimeout" in prompt


def test_served_prompt_length_is_the_trained_prompts(client: openai.OpenAI, tokenizer: Any) -> None:
    body = tool_conversation()
    answer = client.chat.completions.create(**body, max_tokens=1)
    expected = tokenizer(trained_prompt(tokenizer, body), add_special_tokens=False)["input_ids"]
    assert answer.usage is not None and answer.usage.prompt_tokens == len(expected)


# ---------------------------------------------------------------- scripted generations


def scripted_plan(body: dict[str, Any]) -> ChatPlan:
    request = ChatCompletionRequest.model_validate({"model": "tiny", "messages": [{"role": "user"}], **body})
    job = GenerationJob([SequenceSpec([1], 64)], sampling_params(request), "tiny")
    return ChatPlan(request, 1, job, plan_tools(request), call_ids=[new_call_id()])


async def both_answers(
    body: dict[str, Any], text: str, reason: str = "stop"
) -> tuple[ChatCompletion, ChatCompletion, list[ChatCompletionChunk]]:
    """The answer to a generation of `text`, as one response and as a stream (cut into
    3-character deltas) assembled by the openai SDK, and the stream's chunks."""
    whole = chat_response(scripted_plan(body), [SequenceResult(text, reason, 5)])
    plan = scripted_plan(body)
    plan.job.bind(asyncio.get_running_loop())
    pieces = [TextDelta(0, text[i : i + 3]) for i in range(0, len(text), 3)]
    plan.job.emit([*pieces, SequenceFinished(0, reason, 5)])
    raw = b"".join([chunk async for chunk in chat_stream(plan)])
    events = [event[len(b"data: ") :] for event in raw.split(b"\n\n") if event.startswith(b"data: {")]
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events]
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(): that one refuses finish_reason "length".
    assembled = ChatCompletion.model_validate(state.current_completion_snapshot.model_dump())
    return ChatCompletion.model_validate(whole.model_dump()), assembled, chunks


def calls_of(answer: ChatCompletion) -> list[tuple[str, str]]:
    calls = answer.choices[0].message.tool_calls or []
    return [(call.function.name, call.function.arguments) for call in calls if call.type == "function"]


def streamed_content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_auto_reads_calls_after_some_text_in_both_forms() -> None:
    text = 'Let me ping.\n<tool_call>\n{"name":"ping","arguments":{"host":"a.io"}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    whole, streamed, chunks = await both_answers({"tools": PING, "tool_choice": "auto"}, text)
    for answer in (whole, streamed):
        assert answer.choices[0].finish_reason == "tool_calls"
        assert answer.choices[0].message.content == "Let me ping."
        assert calls_of(answer) == [("ping", '{"host":"a.io"}'), ("ping", "{}")]
        assert all(call.id.startswith("call_") for call in answer.choices[0].message.tool_calls or [])
    assert streamed_content(chunks) == "Let me ping."  # nothing of the block leaks as content
    openings = [d.tool_calls[0] for c in chunks if c.choices and (d := c.choices[0].delta).tool_calls]
    assert [(t.index, t.type, t.function and t.function.name) for t in openings if t.id] == [
        (0, "function", "ping"),
        (1, "function", "ping"),
    ]


async def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>\n' * 2
    whole, streamed, _ = await both_answers({"tools": PING, "parallel_tool_calls": False}, text)
    assert calls_of(whole) == calls_of(streamed) == [("ping", "{}")]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Plain answer: 1 < 2 and <tool or <b>.", "stop"),
        ("<tool_call>\n{not json}\n</tool_call>", "stop"),
        (MALFORMED, "stop"),  # a function that was not offered
        ('Ok.\n<tool_call>\n{"name":"ping","arguments":{"host":', "length"),
        ("trailing spaces stay   ", "stop"),
    ],
)
async def test_text_without_a_valid_call_is_the_answer_as_generated(text: str, reason: str) -> None:
    whole, streamed, chunks = await both_answers({"tools": PING}, text, reason)
    for answer in (whole, streamed):
        assert answer.choices[0].message.content == text
        assert answer.choices[0].finish_reason == reason and not answer.choices[0].message.tool_calls
    assert streamed_content(chunks) == text


async def test_tool_choice_none_never_reads_calls() -> None:
    text = '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>'
    whole, streamed, _ = await both_answers({"tools": PING, "tool_choice": "none"}, text)
    assert whole.choices[0].message.content == streamed.choices[0].message.content == text


async def test_required_answer_is_read_with_its_primed_block_opening() -> None:
    whole, streamed, chunks = await both_answers(
        {"tools": PING, "tool_choice": "required"}, '{"name":"ping","arguments":{"host":"b"}}'
    )
    for answer in (whole, streamed):
        assert answer.choices[0].finish_reason == "tool_calls"
        assert answer.choices[0].message.content is None
        assert calls_of(answer) == [("ping", '{"host":"b"}')]
    assert streamed_content(chunks) == ""


# ---------------------------------------------------------------- through the server


WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]


def test_required_call_comes_back_parsed_streamed_and_not(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Weather?"}],
        "max_tokens": 60,
        "temperature": 0,
        "tools": WEATHER_TOOLS,
        "tool_choice": "required",
    }
    whole = client.chat.completions.create(**args)
    with client.chat.completions.stream(**args) as stream:
        streamed = stream.get_final_completion()
    for answer in (whole, streamed):
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (name, arguments), *others = calls_of(answer)
        assert not others and name in {"get_weather", "ping"}
        assert isinstance(json.loads(arguments), dict)
    assert calls_of(whole) == calls_of(streamed)


def trained_chats() -> list[dict[str, Any]]:
    call = {"id": "c", "type": "function", "function": {"name": "ping", "arguments": '{"host": "a.io"}'}}
    turns: list[tuple[str, dict[str, Any]]] = [
        ("Ping a.io", {"content": None, "tool_calls": [call]}),
        ("Say hello", {"content": "Hello there!"}),
        ("Break it", {"content": MALFORMED}),
    ]
    return [
        {"messages": [{"role": "user", "content": ask}, {"role": "assistant", **answer}], "tools": PING}
        for ask, answer in turns
    ]


def train_tool_adapter(base_dir: Path, target: Path, steps: int = 300) -> Path:
    """A LoRA that learns `trained_chats` by heart, on labels from the trainer's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encoded = [tokenize_sample(tokenizer, normalize_sample(chat), 1024) for chat in trained_chats()]
    width = max(len(e["input_ids"]) for e in encoded if e)
    batch = {
        key: torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in encoded if e])
        for key, fill in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100))
    }
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, "the adapter did not learn its chats"
    model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def tool_adapter(
    backend: RemoteBackend, lively_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The trained adapter, loaded into the shared server as `tooly` for this module."""
    path = train_tool_adapter(lively_model_dir, tmp_path_factory.mktemp("tooly") / "tooly")
    loaded = backend.post("/v1/load_lora_adapter", json={"lora_name": "tooly", "lora_path": str(path)})
    assert loaded.status_code == 200, loaded.text
    yield "tooly"
    backend.post("/v1/unload_lora_adapter", json={"lora_name": "tooly"})


def ask_both_ways(client: openai.OpenAI, model: str, ask: str, **extra: Any) -> list[ChatCompletion]:
    args: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": ask}],
        "max_tokens": 60,
        "temperature": 0,
        "tools": PING,
        **extra,
    }
    with client.chat.completions.stream(**args) as stream:
        streamed = stream.get_final_completion()
    return [client.chat.completions.create(**args), streamed]


def test_trained_adapter_calls_its_tool_with_auto(client: openai.OpenAI, tool_adapter: str) -> None:
    for answer in ask_both_ways(client, tool_adapter, "Ping a.io", tool_choice="auto"):
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert calls_of(answer) == [("ping", '{"host":"a.io"}')]


def test_trained_adapter_answers_text_when_it_writes_no_call(
    client: openai.OpenAI, tool_adapter: str
) -> None:
    for answer in ask_both_ways(client, tool_adapter, "Say hello"):
        assert answer.choices[0].message.content == "Hello there!"
        assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls


def test_a_malformed_call_from_the_model_is_returned_as_text(
    client: openai.OpenAI, tool_adapter: str
) -> None:
    for answer in ask_both_ways(client, tool_adapter, "Break it", tool_choice="auto"):
        assert answer.choices[0].message.content == MALFORMED
        assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
