"""A thin route on the bundled SmolLM2: 20 real pairs are all it ever gets before training,
the cloud writes the rest (policy.synthetic), and the route still reaches `local` and answers
prompts it never saw."""

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
from gateway.demo.run import CLOUD_MODEL, ROUTE
from gateway.settings import Settings
from tests.conftest import start_gateway
from tests.gateway.adaptive.test_cycle_smollm2 import _ask, _mode, _parsed, _shared_model_cache
from tests.local_backend.support import free_port

REAL_PAIRS = 20


@pytest.fixture
def writing_cloud() -> Iterator[FakeCloudServer]:
    """Answers the task and, asked for new user messages like some examples, writes them."""
    server = FakeCloudServer(FakeCloud(answer=task.cloud_answer)).start()
    yield server
    server.stop()


def _settings(data_dir: Path, cloud_url: str) -> Settings:
    # The demo's route (json_equal judge, promote after 5) at the default min_samples of a
    # thin route's team (100), with synthetic data from 20 real pairs on.
    return Settings.model_validate(
        {
            "port": 0,
            "data_dir": data_dir,
            # synthetic data is the gateway's own spending: it needs the upstream's own key
            "upstream": {"base_url": cloud_url, "api_key": "sk-gateway"},
            "local": {"enabled": True, "port": free_port()},
            "routes": [
                {
                    "name": ROUTE,
                    "match": [CLOUD_MODEL],
                    "adapt": True,
                    "policy": {
                        "min_samples": 100,
                        "promote_after": 5,
                        "min_pass_rate": 0.5,
                        "threshold": 100,
                        "min_rolling_score": 80,
                        "judge": "json_equal",
                        "eval_rate": 0.1,
                        "window": 30,
                        "demote_after": 6,
                        "cooldown_s": 0,
                        "synthetic": {"enabled": True, "seed_samples": REAL_PAIRS},
                    },
                }
            ],
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_route_with_20_real_pairs_and_synthetic_data_goes_local(
    tmp_path: Path, model_cache_dir: Path, writing_cloud: FakeCloudServer
) -> None:
    data_dir = tmp_path / "data"
    _shared_model_cache(data_dir, model_cache_dir)
    gateway = start_gateway(_settings(data_dir, writing_cloud.base_url))
    try:
        gateway.wait_backend_healthy()
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-app", max_retries=0)
        seeds = task.examples(REAL_PAIRS, seed=1)
        for example in seeds:
            assert _ask(client, example) == ("cloud", example.answer)

        # No more real traffic until the first adapter is trained: only synthetic data can
        # bring the route to min_samples. Live requests then feed the shadow eval.
        live = iter(task.examples(2000, seed=2))
        deadline = time.monotonic() + 1500
        while (state := _mode(gateway))["mode"] != "local":
            assert time.monotonic() < deadline, f"not promoted in time: {state['history'][-3:]}"
            if state["mode"] == "eval":
                _ask(client, next(live))
            time.sleep(1 if state["mode"] == "eval" else 2)

        controller = gateway.app.services.controller
        assert controller is not None
        first = controller.adapters.versions(ROUTE)[0]
        assert first.meta["real_count"] == REAL_PAIRS, first.meta
        assert first.meta["synthetic_count"] >= 100 - REAL_PAIRS - 5, first.meta
        heldout = [orjson.loads(line) for line in first.heldout_path.read_text().splitlines()]
        real_sentences = {e.sentence for e in seeds}
        assert heldout and all(_last_user(s) in real_sentences for s in heldout)  # graded: real only
        store = gateway.app.services.store
        assert list(store.iter_records(route=ROUTE, kind="synthetic_prompts"))
        assert sum(1 for _ in store.iter_records(route=ROUTE, kind="synthetic")) >= 100 - REAL_PAIRS - 5

        unseen = task.examples(12, seed=3)
        results = [_ask(client, example) for example in unseen]
        assert {backend for backend, _ in results} == {"local"}
        correct = sum(
            _parsed(answer) == orjson.loads(e.answer) for (_, answer), e in zip(results, unseen, strict=True)
        )
        assert correct >= 9, [answer for _, answer in results]
    finally:
        gateway.stop()


def _last_user(sample: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(sample["messages"]) if m["role"] == "user")
