"""A real gateway with an adaptive route for the admin API, dashboard and CLI tests, cheap
enough to start per test: the local backend is a second fake cloud (it answers the vLLM-style
adapter calls and chats), two adapter versions and a `local` route state are seeded on disk,
and training jobs run a stub that fails at once (these tests are about the HTTP contract;
tests/gateway/adaptive covers real training)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import load_settings
from gateway.store.sqlite import SQLiteStore
from tests.conftest import RunningGateway, start_gateway

ADMIN_KEY = "admin-key-for-tests"
ROUTE = "task"


@dataclass
class AdaptiveGateway:
    gateway: RunningGateway
    local: FakeCloudServer

    @property
    def url(self) -> str:
        return self.gateway.url

    def chat(self, text: str, model: str = "task-1", **extra: Any) -> tuple[str, str]:
        """One chat through the gateway: (backend, answer)."""
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="sk-test", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], **extra
        )
        return raw.headers["x-understudy-backend"], raw.parse().choices[0].message.content or ""


def _seed(data_dir: Path) -> None:
    for version in (1, 2):
        folder = data_dir / "adapters" / ROUTE / f"v{version}"
        folder.mkdir(parents=True)
        meta = {
            "sample_count": 40 * version,
            # v2: a thin route's adapter, most of its pairs written by the cloud
            **({"real_count": 20, "synthetic_count": 60, "imported_count": 0} if version == 2 else {}),
            "train_loss": 0.5 / version,
            "loss_history": [3.1, 1.9, 0.9, 0.5],
        }
        (folder / "meta.json").write_text(orjson.dumps(meta).decode())
    store = SQLiteStore(data_dir / "understudy.db")
    store.open()
    now = time.time()
    history = [
        {"ts": now - 300, "from": "cloud", "to": "training", "reason": "training job ftjob-seed started"},
        {"ts": now - 240, "from": "training", "to": "eval", "reason": "adapter v1 trained; evaluating"},
        {"ts": now - 120, "from": "eval", "to": "local", "reason": "3 passes in a row"},
    ]
    state = {"route": ROUTE, "mode": "local", "active_version": 1, "history": history}
    store.save_route_state(ROUTE, state)
    store.close()


@contextlib.contextmanager
def running_adaptive_gateway(
    tmp_path: Path, cloud: FakeCloudServer, admin_key: str | None = ADMIN_KEY, **overrides: Any
) -> Iterator[AdaptiveGateway]:
    data_dir = tmp_path / "adaptive-data"
    _seed(data_dir)
    local = FakeCloudServer(FakeCloud()).start()
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    settings = load_settings(
        config,
        environ={},
        data_dir=data_dir,
        admin_key=admin_key,
        **overrides,
        upstream={"base_url": cloud.base_url, "retry": {"attempts": 1}},
        local={"enabled": True, "base_url": local.base_url},
        routes=[
            {
                "name": ROUTE,
                "match": ["task-*"],
                "upstream_model": "gpt-4o-mini",
                "adapt": True,
                "policy": {"judge": "exact", "eval_rate": 0.0, "min_samples": 10_000},
            }
        ],
    )
    gateway = start_gateway(settings)
    controller = gateway.app.services.controller
    assert controller is not None
    stub = tmp_path / "trainer-stub"
    stub.write_text("#!/bin/sh\nsleep 0.2\necho 'stub trainer: no training in this test' >&2\nexit 3\n")
    stub.chmod(0o755)
    controller.jobs.python = str(stub)
    try:
        yield AdaptiveGateway(gateway, local)
    finally:
        gateway.stop()
        local.stop()
