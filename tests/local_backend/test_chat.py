"""Chat and legacy completions through the real server, with the official openai client."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
import torch

from tests.local_backend.support import RemoteBackend, torch_threads

HELLO: list[Any] = [{"role": "user", "content": "hello world"}]


def reference_greedy(reference: tuple[Any, Any], messages: list[dict[str, str]], tokens: int) -> str:
    """What `model.generate` answers greedily, `tokens` tokens long, in this process."""
    model, tokenizer = reference
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch_threads(1), torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


async def test_concurrent_requests_are_batched_and_match_generate(
    backend: RemoteBackend, tiny_reference: tuple[Any, Any]
) -> None:
    conversations: list[Any] = [
        [{"role": "user", "content": "the quick brown fox " * k}] for k in (1, 2, 4, 7)
    ]
    steps_before = backend.metric("understudy_backend_batch_size_count")
    small_before = backend.metric("understudy_backend_batch_size_bucket", 'le="3.0"')
    client = backend.async_client()
    answers = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="tiny", messages=m, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
            )
            for m in conversations
        )
    )
    for messages, answer in zip(conversations, answers, strict=True):
        assert answer.choices[0].message.content == reference_greedy(tiny_reference, messages, 24)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None and answer.usage.completion_tokens == 24
    steps = backend.metric("understudy_backend_batch_size_count") - steps_before
    small_steps = backend.metric("understudy_backend_batch_size_bucket", 'le="3.0"') - small_before
    assert steps > small_steps, "the four requests never decoded in one batch"


def test_stream_has_openai_chunk_shape_and_matches_non_stream(
    client: openai.OpenAI, tiny_reference: tuple[Any, Any]
) -> None:
    args: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 30, "temperature": 0}
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {whole.id} or len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage == whole.usage
    _, tokenizer = tiny_reference
    prompt_ids = tokenizer.apply_chat_template(
        HELLO, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert whole.usage is not None and whole.usage.prompt_tokens == len(prompt_ids["input_ids"])


def test_stream_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True))
    assert chunks and all(c.usage is None and c.choices for c in chunks)


def test_stop_string_cuts_the_answer_before_it(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 40, "temperature": 0}
    full = client.chat.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].message.content
    assert full is not None and len(full) > 20
    stop = full[12:15]
    cut = client.chat.completions.create(**args, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**args, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]
    )


def test_end_of_sequence_finishes_with_stop_and_min_tokens_delays_it(
    client: openai.OpenAI, tiny_reference: tuple[Any, Any]
) -> None:
    eos = str(tiny_reference[1].eos_token_id)
    ended = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, logit_bias={eos: 100})
    assert ended.choices[0].finish_reason == "stop"
    assert ended.choices[0].message.content == ""
    assert ended.usage is not None and ended.usage.completion_tokens == 1
    later = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=20, logit_bias={eos: 100}, extra_body={"min_tokens": 5}
    )
    assert later.choices[0].finish_reason == "stop"
    assert later.usage is not None and later.usage.completion_tokens == 6


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_choices(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 0.9,
    }
    first = client.chat.completions.create(**args, seed=11, n=3)
    again = client.chat.completions.create(**args, seed=11, n=3)
    other = client.chat.completions.create(**args, seed=12, n=3)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert len(set(texts)) > 1
    assert first.usage is not None and first.usage.completion_tokens == 36


def test_completions_number_choices_per_prompt_and_echo(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="tiny", prompt=["hello", "the quick brown fox"], n=2, max_tokens=6, temperature=0
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text != result.choices[2].text
    assert all(c.finish_reason in ("stop", "length") for c in result.choices)
    echoed = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "hello" + result.choices[0].text
    streamed = client.completions.create(
        model="tiny", prompt="hello", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text


def test_completions_accept_token_ids(client: openai.OpenAI, tiny_reference: tuple[Any, Any]) -> None:
    ids = tiny_reference[1]("hello")["input_ids"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nobody", "messages": HELLO}, 404, "model_not_found"),
        ({"model": "tiny", "messages": "hi"}, 400, "invalid_request"),
        ({"model": "tiny", "messages": HELLO, "temperature": 7}, 400, "invalid_request"),
        ({"model": "tiny", "messages": HELLO, "logit_bias": {"x": 1}}, 400, "invalid_request"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "invalid_request",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "fox " * 600}]},
            400,
            "context_length_exceeded",
        ),
        ({"model": "tiny", "messages": HELLO, "max_tokens": 100_000}, 400, "context_length_exceeded"),
        (
            {
                "model": "tiny",
                "messages": HELLO,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                },
            },
            400,
            "invalid_schema",
        ),
    ],
)
def test_client_mistakes_get_openai_errors(
    backend: RemoteBackend, body: dict[str, Any], status: int, code: str
) -> None:
    response = backend.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


def test_context_error_states_the_lengths(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1000)
    message = str(caught.value)
    assert "512" in message and "1000 in the completion" in message


def test_bad_json_unknown_route_and_method_are_json_errors(backend: RemoteBackend) -> None:
    bad = backend.post("/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = backend.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = backend.get("/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
