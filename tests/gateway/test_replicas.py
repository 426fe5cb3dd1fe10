"""Two gateway replicas on one PostgreSQL share a route: a pin on one applies on both within
2 s, verdicts from both land in the route's one window, and only one replica trains."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import load_settings
from gateway.store.postgres import PostgresStore
from tests.conftest import RunningGateway, start_gateway

ROUTE = "support"


@pytest.fixture
def fake_local() -> Iterator[FakeCloudServer]:
    """The local backend: the fake cloud answers /v1/load_lora_adapter (its catch-all) and
    chat with the same text as the cloud, so the `exact` judge passes every spot check."""
    server = FakeCloudServer(FakeCloud()).start()
    yield server
    server.stop()


def _plant_adapter(data_dir: Path, version: int) -> None:
    folder = data_dir / "adapters" / ROUTE / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "meta.json").write_text(json.dumps({"base_model": "tiny", "version": version}))


@pytest.fixture
def replicas(
    tmp_path: Path, postgres_url: str, fake_cloud: FakeCloudServer, fake_local: FakeCloudServer
) -> Iterator[Callable[..., tuple[RunningGateway, RunningGateway]]]:
    running: list[RunningGateway] = []

    def start(state: dict[str, Any] | None = None, **policy: Any) -> tuple[RunningGateway, RunningGateway]:
        data_dir = tmp_path / "shared"  # the adapters volume every replica mounts
        _plant_adapter(data_dir, 1)
        if state is not None:
            store = PostgresStore(postgres_url)
            store.open()
            store.save_route_state(ROUTE, {"route": ROUTE, **state})
            store.close()
        config = tmp_path / "gateway.yaml"
        config.write_text("{}\n")
        route = {
            "name": ROUTE,
            "match": ["support-*"],
            "adapt": True,
            "policy": {"judge": "exact", "eval_rate": 1.0, "window": 500, **policy},
        }
        settings = load_settings(
            config,
            environ={},
            data_dir=data_dir,
            database_url=postgres_url,
            upstream={"base_url": fake_cloud.base_url},
            local={"enabled": True, "base_url": fake_local.base_url},
            routes=[route],
        )
        pair = (start_gateway(settings), start_gateway(settings))
        running.extend(pair)
        return pair

    yield start
    for gateway in running:
        gateway.stop()


async def _route(session: aiohttp.ClientSession, gateway: RunningGateway) -> dict[str, Any]:
    async with session.get(f"{gateway.url}/admin/routes/{ROUTE}") as response:
        assert response.status == 200
        return dict(await response.json())


async def _chat(session: aiohttp.ClientSession, gateway: RunningGateway, i: int) -> str:
    body = {"model": "support-1", "messages": [{"role": "user", "content": f"q{i}"}]}
    async with session.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        await response.read()
        return response.headers["x-understudy-backend"]


async def test_a_pin_on_one_replica_applies_on_the_other_within_two_seconds(
    replicas: Callable[..., tuple[RunningGateway, RunningGateway]],
) -> None:
    a, b = replicas({"mode": "local", "active_version": 1}, eval_rate=0.0)
    async with aiohttp.ClientSession() as session:
        assert await _chat(session, b, 0) == "local"
        async with session.post(f"{a.url}/admin/routes/{ROUTE}/mode", json={"mode": "cloud"}) as response:
            assert response.status == 200
        pinned_at = time.monotonic()
        while (await _route(session, b))["pinned"] != "cloud":
            assert time.monotonic() - pinned_at < 2.0, "replica b never saw the pin"
            await asyncio.sleep(0.05)
        assert await _chat(session, b, 1) == "cloud"


async def test_verdicts_from_both_replicas_feed_one_window_and_none_is_lost(
    replicas: Callable[..., tuple[RunningGateway, RunningGateway]], postgres_url: str
) -> None:
    a, b = replicas({"mode": "local", "active_version": 1})
    async with aiohttp.ClientSession() as session:
        for wave in range(4):  # every local answer is spot-checked, on the replica that served it
            served = await asyncio.gather(
                *(_chat(session, g, wave * 8 + i) for i in range(4) for g in (a, b))
            )
            assert set(served) == {"local"}
    store = PostgresStore(postgres_url)
    deadline, seen, stable_since = time.monotonic() + 30, -1, time.monotonic()
    while True:
        verdicts = [e for e in store.list_evals(ROUTE, 1000) if e["passed"] is not None]
        state = store.load_route_state(ROUTE)
        assert state is not None
        if len(verdicts) != seen:
            seen, stable_since = len(verdicts), time.monotonic()
        elif time.monotonic() - stable_since > 1.5:
            break  # the spot checks are all judged
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    store.close()
    assert len(verdicts) >= 8 and {e["passed"] for e in verdicts} == {True}
    assert len(state["window"]) == len(verdicts)  # every replica's verdicts, none lost
    assert state["mode"] == "local"


async def test_only_one_replica_starts_the_routes_training_job(
    replicas: Callable[..., tuple[RunningGateway, RunningGateway]],
) -> None:
    a, b = replicas(min_samples=6, cooldown_s=0)
    started: list[str] = []
    for name, gateway in (("a", a), ("b", b)):
        controller = gateway.app.services.controller
        assert controller is not None
        _fake_trainer(controller.jobs, name, started)
    async with aiohttp.ClientSession() as session:
        for wave in range(4):
            await asyncio.gather(*(_chat(session, g, wave * 8 + i) for i in range(4) for g in (a, b)))
        deadline = time.monotonic() + 10
        while [(await _route(session, g))["mode"] for g in (a, b)] != ["training", "training"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # both replicas keep checking their new pairs meanwhile
        views = [await _route(session, g) for g in (a, b)]
    assert len(started) == 1
    assert views[0]["job_id"] == views[1]["job_id"] == started[0]


def _fake_trainer(jobs: Any, replica: str, started: list[str]) -> None:
    """Stand in for the trainer subprocess: record the start, then train forever."""

    async def start(route: str, spec: Any, failed_pairs: Any = None) -> str:
        job_id = f"job-{replica}-{len(started)}"
        started.append(job_id)
        return job_id

    async def wait(job_id: str) -> dict[str, Any] | None:
        await asyncio.Event().wait()
        return None

    jobs.start, jobs.wait = start, wait
    jobs.status = lambda job_id: {"status": "training"} if job_id.startswith(f"job-{replica}") else None
