"""A thin route on the bundled SmolLM2: 20 real pairs are all it ever gets before training,
the cloud writes the rest (policy.synthetic), and the route still reaches `local` and answers
prompts it never saw."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo import task
from gateway.demo.fakecloud import FakeCloudServer
from gateway.demo.run import ROUTE, demo_settings
from tests.conftest import start_gateway
from tests.gateway.adaptive.test_cycle_smollm2 import _ask, _mode, _parsed, _shared_model_cache

REAL_PAIRS = 20


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_route_with_20_real_pairs_and_synthetic_data_goes_local(
    tmp_path: Path, model_cache_dir: Path, extraction_cloud: FakeCloudServer
) -> None:
    # The demo's route at a thin route's min_samples (100), synthetic data on from 20 real
    # pairs; the simulated cloud (task.cloud_answer) also writes task sentences when asked.
    data_dir = tmp_path / "data"
    _shared_model_cache(data_dir, model_cache_dir)
    synthetic = {"enabled": True, "seed_samples": REAL_PAIRS}
    settings = demo_settings(
        data_dir, extraction_cloud.base_url, 0, 100, upstream_key="sk-gateway", synthetic=synthetic
    )
    gateway = start_gateway(settings)
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
