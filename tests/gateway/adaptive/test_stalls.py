"""Every state a route can get stuck in shows: a local backend that cannot generate with an
adapter holds training on /readyz and in a metric, and an eval that cannot decide ends at its
deadline. Real gateway, real local backend, the fake cloud."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloudServer
from gateway.settings import load_settings
from local_backend.server import create_app as create_backend
from local_backend.settings import Settings as BackendSettings
from tests.conftest import RunningGateway, start_gateway
from tests.local_backend.test_selftest import INCOMPATIBLE, serving, wait_healthy


@pytest.fixture
def incompatible_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers refuses the installed peft, as transformers 5.24 refused peft 0.21.2."""
    monkeypatch.setattr("transformers.integrations.peft.MIN_PEFT_VERSION", "0.22.0")


@pytest.fixture
def broken_backend(tiny_model_dir: Path, tmp_path: Path, incompatible_peft: None) -> Iterator[str]:
    settings = BackendSettings(model=str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path / "lb")
    with serving(create_backend(settings)) as base_url:
        wait_healthy(base_url)
        yield base_url


def _readyz(gateway: RunningGateway) -> dict[str, Any]:
    with urllib.request.urlopen(gateway.url + "/readyz") as response:
        assert response.status == 200  # still proxying: degraded, not down
        return dict(orjson.loads(response.read()))


def _metric_line(gateway: RunningGateway, prefix: str) -> str:
    with urllib.request.urlopen(gateway.url + "/metrics") as response:
        lines = [line for line in response.read().decode().splitlines() if line.startswith(prefix)]
    assert lines, prefix
    return lines[0]


def test_a_backend_that_cannot_generate_with_an_adapter_holds_training_visibly(
    tmp_path: Path, fake_cloud: FakeCloudServer, broken_backend: str
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    settings = load_settings(
        config,
        environ={},
        data_dir=tmp_path / "data",
        upstream={"base_url": fake_cloud.base_url},
        local={"enabled": True, "base_url": broken_backend + "/v1"},
        routes=[
            {
                "name": "task",
                "match": ["task-*"],
                "adapt": True,
                "policy": {"min_samples": 2, "cooldown_s": 0},
            }
        ],
    )
    gateway = start_gateway(settings)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0)
        for i in range(5):
            client.chat.completions.create(model="task-1", messages=[{"role": "user", "content": f"q{i}"}])
        time.sleep(1.5)  # past the controller's once-a-second training check
        ready = _readyz(gateway)
        assert ready["status"] == "degraded"
        assert any(INCOMPATIBLE in problem for problem in ready["problems"]), ready
        assert ready["routes"]["task"]["mode"] == "cloud"
        controller = gateway.app.services.controller
        assert controller is not None
        assert controller.describe("task")["job_id"] is None and controller.describe("task")["blocked"]
        assert _metric_line(gateway, "understudy_local_selftest_ok").endswith(" 0.0")
        # the 5 pairs it could train on, on the route and in a metric
        assert controller.describe("task")["pending_pairs"] == 5
        assert _metric_line(gateway, 'understudy_route_pending_pairs{route="task"}').endswith(" 5.0")
        assert _metric_line(gateway, 'understudy_route_blocked{reason="selftest",route="task"}').endswith(
            " 1.0"
        )
    finally:
        gateway.stop()
