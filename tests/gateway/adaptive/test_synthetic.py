"""Synthetic data for thin routes: the generator on a scripted cloud, and a real gateway whose
route has too few real pairs to train until the cloud writes more like them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.adaptive.synthetic import Synthesizer
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import SyntheticSettings, load_settings
from tests.conftest import RunningGateway, start_gateway
from tests.local_backend.support import free_port

ANIMALS = [
    "otter",
    "heron",
    "lynx",
    "gecko",
    "bison",
    "crane",
    "moose",
    "ibis",
    "newt",
    "puma",
    "yak",
    "wren",
]
REAL = [f"Tell me one fact about the {animal}." for animal in ("fox", "owl", "bee", "eel")]


def _chat(content: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}], "model": "m"}


class ScriptedCloud:
    """Writes prompts from a fixed list (repeating some, copying a real one) and answers."""

    def __init__(self, per_call: int = 3) -> None:
        self.fresh = iter(f"What does a {animal} eat in winter?" for animal in ANIMALS)
        self.per_call = per_call
        self.calls: list[str] = []

    async def __call__(self, body: dict[str, Any], kind: str) -> dict[str, Any]:
        self.calls.append(kind)
        if kind == "synthetic_prompts":
            batch = list(itertools.islice(self.fresh, self.per_call))
            return _chat(
                orjson.dumps([*batch, REAL[0], "tell me one fact about the FOX!", *batch[:1]]).decode()
            )
        return _chat("An answer.")


def _generator(cloud: ScriptedCloud, price: float = 0.0, **settings: Any) -> Synthesizer:
    return Synthesizer(
        SyntheticSettings(enabled=True, **settings),
        cloud,
        lambda answer: price,
        [
            {
                "model": "m",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
            }
            for text in REAL
        ],
        list(REAL),
    )


async def test_new_prompts_are_distinct_and_never_near_a_real_one() -> None:
    cloud = ScriptedCloud()
    outcome = await _generator(cloud, per_call=3).run(wanted=8)
    assert outcome.added == 8 and len(set(outcome.prompts)) == 8
    assert not any("fox" in prompt.lower() for prompt in outcome.prompts)  # copies of a real prompt
    assert outcome.dropped >= 2 * 3  # each call: the copy, its shouting twin, the repeat
    assert cloud.calls.count("synthetic") == 8


async def test_spend_stops_at_the_cost_cap() -> None:
    cloud = ScriptedCloud()
    outcome = await _generator(cloud, price=0.01, per_call=3, max_cost_usd=0.035).run(wanted=50)
    assert outcome.spent_usd == pytest.approx(0.04)  # the call that crossed the cap is the last
    assert outcome.calls == 4 and "cost cap" in outcome.stopped


async def test_a_writer_that_repeats_itself_is_given_up_on() -> None:
    cloud = ScriptedCloud()
    cloud.fresh = iter([])
    outcome = await _generator(cloud).run(wanted=5)
    assert outcome.added == 0 and "wrote nothing new" in outcome.stopped and outcome.calls == 3


def _cloud_answer(body: dict[str, Any]) -> str:
    system = str(body["messages"][0].get("content", ""))
    if "realistic new user messages" in system:
        _cloud_answer.batch += 1  # type: ignore[attr-defined]
        start = 4 * _cloud_answer.batch  # type: ignore[attr-defined]
        return orjson.dumps(
            [f"Which river is the {i}th longest in {ANIMALS[i % 12]}land?" for i in range(start, start + 4)]
        ).decode()
    return f"ANSWER: {str(body['messages'][-1]['content']).upper()}"


@pytest.fixture
def cloud() -> Iterator[FakeCloudServer]:
    _cloud_answer.batch = 0  # type: ignore[attr-defined]
    server = FakeCloudServer(FakeCloud(answer=_cloud_answer)).start()
    yield server
    server.stop()


@pytest.mark.timeout(600)
def test_a_thin_route_trains_on_real_plus_synthetic_pairs(
    tmp_path: Path, tiny_model_dir: Path, cloud: FakeCloudServer
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    settings = load_settings(
        config,
        environ={},
        data_dir=tmp_path / "data",
        upstream={"base_url": cloud.base_url, "api_key": "sk-gateway", "retry": {"attempts": 1}},
        local={"enabled": True, "model": str(tiny_model_dir), "port": free_port(), "startup_timeout_s": 120},
        routes=[
            {
                "name": "thin",
                "match": ["gpt-4o-mini"],
                "adapt": True,
                "local_model": str(tiny_model_dir),
                "policy": {
                    "min_samples": 14,
                    "cooldown_s": 0,
                    "judge": "exact",
                    "synthetic": {"enabled": True, "seed_samples": 4, "per_call": 4},
                },
                "training": {"max_steps": 2, "threads": 1},
            }
        ],
    )
    gateway: RunningGateway = start_gateway(settings)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-app", max_retries=0)
        for text in [*REAL, "One more fact about the cat, please.", "And a fact about the ant?"]:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
        controller = gateway.app.services.controller
        assert controller is not None
        deadline = time.monotonic() + 240
        while (
            controller.describe("thin")["active_adapter"] is None
            and controller.describe("thin")["candidate_adapter"] is None
        ):
            assert time.monotonic() < deadline, controller.describe("thin")["history"][-3:]
            time.sleep(0.3)
        store = gateway.app.services.store
        synthetic = list(store.iter_records(route="thin", kind="synthetic"))
        assert len(synthetic) >= 8 and list(store.iter_records(route="thin", kind="synthetic_prompts"))
        assert all(r["request"]["model"] == "gpt-4o-mini" for r in synthetic)
        adapters = controller.adapters
        (version,) = adapters.versions("thin")
        assert version.meta["real_count"] == 6 and version.meta["synthetic_count"] >= 8
        held = version.heldout_path.read_text()
        assert "river" not in held  # the judge only ever grades real traffic
        history = " ".join(h["reason"] for h in controller.describe("thin")["history"])
        assert "synthetic data:" in history
    finally:
        gateway.stop()
