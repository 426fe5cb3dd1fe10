"""The real loop on a tool-calling route, on the bundled SmolLM2: a client offers one tool
(`record_person`) with tool_choice "auto" and the cloud always calls it; the route trains on
those calls, the json_equal judge (tool calls compared as parsed JSON) promotes it, and the
client then gets OpenAI `tool_calls` from the local model, streamed and not, on prompts it
never trained on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo import task
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.demo.run import CLOUD_MODEL, ROUTE, free_port
from gateway.settings import Settings
from tests.conftest import RunningGateway, start_gateway
from tests.gateway.adaptive.test_cycle_tools import ask, ask_streamed, calls_of

RECORD_PERSON: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "record_person",
        "description": "Record the person a sentence describes.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "city": {"type": "string"},
            },
            "required": ["name", "age", "city"],
        },
    },
}
SYSTEM = "Record the person the sentence describes: call record_person with their name, age and city."
# Small and quick, not the defaults (bench/adaptive.py --variant tools runs those): 40 pairs,
# 20 steps at a higher learning rate and no validation slice teach the call's form (measured:
# every answer a well-formed call, ~75-90% with the right arguments), and a bar that 5 straight
# passes clear (the Wilson lower bound of 5/5 is 0.57). ~100 s on 2 quiet cores.
SAMPLES = 40
POLICY: dict[str, Any] = {
    "min_samples": SAMPLES,
    "promote_after": 5,
    "min_pass_rate": 0.5,
    "judge": "json_equal",
    "eval_rate": 0.0,
    "cooldown_s": 0,
}
TRAINING = {"max_steps": 20, "learning_rate": 4e-4, "validation_fraction": 0.0}


def record_person_calls(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The cloud's answer whenever record_person is offered: the exact extraction, as a call."""
    if not body.get("tools"):
        return None
    return [{"function": {"name": "record_person", "arguments": orjson.loads(task.cloud_answer(body))}}]


@pytest.fixture
def tool_cloud() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeCloud(answer=task.cloud_answer, tool_answer=record_person_calls)).start()
    yield server
    server.stop()


def _start(tmp_path: Path, model_cache_dir: Path, cloud: FakeCloudServer) -> RunningGateway:
    data_dir = tmp_path / "data"
    (model_cache_dir / "models").mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True)
    (data_dir / "models").symlink_to(model_cache_dir / "models")  # one GGUF conversion per session
    route = {"name": ROUTE, "match": [CLOUD_MODEL], "adapt": True, "policy": POLICY, "training": TRAINING}
    settings = Settings.model_validate(
        {
            "data_dir": data_dir,
            "upstream": {"base_url": cloud.base_url},
            "local": {"enabled": True, "port": free_port()},
            "routes": [route],
        }
    )
    gateway = start_gateway(settings)
    gateway.wait_backend_healthy(300)
    return gateway


def _request(example: task.Example) -> dict[str, Any]:
    return {
        "model": CLOUD_MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": example.sentence}],
        "max_tokens": 64,  # a call block is ~40 SmolLM2 tokens
        "temperature": 0,
        "tools": [RECORD_PERSON],
        "tool_choice": "auto",
    }


def _mode(gateway: RunningGateway) -> dict[str, Any]:
    controller = gateway.app.services.controller
    assert controller is not None
    return controller.describe(ROUTE)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_smollm2_learns_a_tool_calling_route_and_answers_with_tool_calls(
    tmp_path: Path, model_cache_dir: Path, tool_cloud: FakeCloudServer
) -> None:
    gateway = _start(tmp_path, model_cache_dir, tool_cloud)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-tools", max_retries=0)
        for example in task.examples(SAMPLES, seed=1):
            backend, answer = ask(client, **_request(example))
            assert backend == "cloud"
            assert calls_of(answer) == [("record_person", orjson.loads(example.answer))]

        live = iter(task.examples(2000, seed=2))
        deadline = time.monotonic() + 1200
        while (state := _mode(gateway))["mode"] != "local":
            assert time.monotonic() < deadline, f"not promoted in time: {state['history']}"
            assert state["failed_trainings"] == 0, state["history"]
            if state["mode"] in ("cloud", "eval"):
                ask(client, **_request(next(live)))  # logged while cloud; shadowed while eval
            time.sleep(0.2 if state["mode"] == "cloud" else 1)
        controller = gateway.app.services.controller
        assert controller is not None
        assert controller.traits(f"{ROUTE}-v{state['active_adapter']}").trained_with_tools

        unseen = task.examples(6, seed=3)
        assert not {e.sentence for e in unseen} & {e.sentence for e in task.examples(SAMPLES, seed=1)}
        right = 0
        for i, example in enumerate(unseen):
            backend, answer = (ask_streamed if i % 2 else ask)(client, **_request(example))
            assert backend == "local"
            assert answer.choices[0].finish_reason == "tool_calls", answer
            ((name, arguments),) = calls_of(answer)  # arguments that are not JSON fail here
            assert name == "record_person" and set(arguments) == {"name", "age", "city"}
            right += arguments == orjson.loads(example.answer)
        # The form is the point here; the extraction itself only has to be mostly right.
        assert right >= 3, f"{right}/6 calls with the right arguments"
    finally:
        gateway.stop()
