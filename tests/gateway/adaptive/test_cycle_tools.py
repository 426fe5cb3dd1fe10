"""A tool-calling route through the whole cycle on the tiny random Llama: a client offers a
tool with tool_choice "auto", the cloud answers with tool calls, the route trains (with the
tools in its prompts), is promoted by the scripted grader, and then the local model answers
tool requests with OpenAI `tool_calls`, streamed and not.

The tiny model's free text is gibberish, so after promotion the plumbing is checked with
tool_choice "required" (a constrained call); tests/gateway/adaptive/test_cycle_tools_smollm2.py
shows the bundled model learning to call the tool on its own ("auto")."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion

from gateway.demo.fakecloud import FakeCloudServer
from tests.conftest import RunningGateway

# The cycle's fixtures: a gateway supervising the tiny model, and a fake cloud that grades.
from tests.gateway.adaptive.test_cycle import cycle_gateway, grader, task_cloud  # noqa: F401

CITIES = ("Paris", "Oslo", "Lima")
# Short on purpose: the tiny model's context is 512 tokens and its tokenizer splits finely.
LOOKUP: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": list(CITIES)}},
            "required": ["city"],
        },
    },
}


def city_for(text: str) -> str:
    return CITIES[sum(map(ord, text)) % len(CITIES)]


def lookup_calls(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The scripted cloud's tool answer: when `lookup` is offered, call it."""
    if not any(t.get("function", {}).get("name") == "lookup" for t in body.get("tools") or []):
        return None
    question = str(body["messages"][-1]["content"])
    return [{"function": {"name": "lookup", "arguments": {"city": city_for(question)}}}]


def calls_of(completion: ChatCompletion) -> list[tuple[str, Any]]:
    """(name, parsed arguments) of each tool call; arguments that are not JSON fail the test."""
    calls = completion.choices[0].message.tool_calls or []
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls if c.type == "function"]


def ask(client: openai.OpenAI, **args: Any) -> tuple[str, ChatCompletion]:
    """(X-Understudy-Backend, the answer)."""
    raw = client.chat.completions.with_raw_response.create(**args)
    return raw.headers["x-understudy-backend"], raw.parse()


def ask_streamed(client: openai.OpenAI, **args: Any) -> tuple[str, ChatCompletion]:
    """The same, streamed; the deltas are put together by the openai SDK's stream helper (its
    snapshot: the final completion refuses answers cut at max_tokens)."""
    raw = client.chat.completions.with_raw_response.create(stream=True, **args)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in raw.parse():
        state.handle_chunk(chunk)
    snapshot = state.current_completion_snapshot
    return raw.headers["x-understudy-backend"], ChatCompletion.model_validate(snapshot.model_dump())


def _client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-task", max_retries=0)


def _tool_request(text: str, tool_choice: str = "auto") -> dict[str, Any]:
    return {
        "model": "task-1",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 100,
        "tools": [LOOKUP],
        "tool_choice": tool_choice,
    }


def _state(gateway: RunningGateway) -> dict[str, Any]:
    controller = gateway.app.services.controller
    assert controller is not None
    return controller.describe("task")


def _learn_until_local(gateway: RunningGateway, timeout: float = 420) -> dict[str, Any]:
    """Offer the tool until the route is promoted: the cloud's calls are logged (cloud), then
    shadowed by the candidate (eval). Every third request streams: the gateway assembles the
    streamed calls into the record it trains on."""
    client = _client(gateway)
    deadline, n = time.monotonic() + timeout, 0
    while (state := _state(gateway))["mode"] != "local":
        assert time.monotonic() < deadline, f"route stuck in {state['mode']}: {state['history'][-3:]}"
        if state["mode"] in ("cloud", "eval"):
            n += 1
            text = f"weather question {n}"
            backend, answer = (ask_streamed if n % 3 == 0 else ask)(client, **_tool_request(text))
            assert backend == "cloud"
            assert calls_of(answer) == [("lookup", {"city": city_for(text)})]
            assert answer.choices[0].finish_reason == "tool_calls"
        time.sleep(0.1 if state["mode"] == "cloud" else 0.3)
    return state


@pytest.mark.timeout(900)
def test_tool_calling_route_learns_and_the_local_model_answers_with_tool_calls(
    cycle_gateway: Callable[..., RunningGateway],  # noqa: F811 (the imported fixture)
    task_cloud: FakeCloudServer,  # noqa: F811
) -> None:
    task_cloud.cloud.tool_answer = lookup_calls
    gateway = cycle_gateway()
    state = _learn_until_local(gateway)
    assert [h["to"] for h in state["history"]] == ["training", "eval", "local"]
    adapter = f"task-v{state['active_adapter']}"
    controller = gateway.app.services.controller
    assert controller is not None
    assert controller.traits(adapter).trained_with_tools
    meta = controller.adapters.get("task", state["active_adapter"]).meta
    assert meta["trained_with_tools"] is True
    evals = gateway.app.services.store.list_evals("task", 100)
    assert evals and all('"lookup"' in e["cloud_answer"] for e in evals if e["phase"] != "spot")

    client = _client(gateway)
    for send in (ask, ask_streamed):
        backend, answer = send(client, **_tool_request(f"{send.__name__} required", "required"))
        assert backend == "local"
        assert answer.choices[0].finish_reason == "tool_calls"
        ((name, arguments),) = calls_of(answer)
        assert name == "lookup" and isinstance(arguments, dict)
        backend, answer = send(client, **_tool_request(f"{send.__name__} auto"))
        assert backend == "local"  # gibberish from the tiny model, but the local model's own
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
        calls_of(answer)  # any call it did write has JSON arguments

    # A request without tools is not what this adapter learned: the cloud answers it.
    plain = client.chat.completions.with_raw_response.create(
        model="task-1", messages=[{"role": "user", "content": "no tools"}], max_tokens=8
    )
    assert plain.headers["x-understudy-backend"] == "cloud"
    with urllib.request.urlopen(gateway.url + "/metrics") as response:
        metrics = response.read().decode()
    assert 'understudy_local_skipped_total{reason="tools_mismatch",route="task"}' in metrics
