"""The adaptive cycle end to end: a real gateway supervising a real local backend (tiny random
Llama), real training subprocesses, and a fake cloud that answers the task and, as the
upstream judge, grades local answers with scores the test scripts."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import load_settings
from tests.conftest import RunningGateway, start_gateway


@dataclass
class Grader:
    """What the fake cloud answers when it is asked to grade."""

    score: float = 90.0
    garbage: bool = False
    graded: int = 0

    def answer(self, body: dict[str, Any]) -> str:
        system = body["messages"][0]["content"] if body.get("messages") else ""
        if "strict grader" in str(system):
            self.graded += 1
            if self.garbage:
                return "I refuse to answer in JSON"
            return orjson.dumps(
                {"similarity": self.score, "precision": self.score, "reason": "scripted"}
            ).decode()
        question = body["messages"][-1]["content"]
        return f"ANSWER: {str(question).upper()}"


@pytest.fixture
def grader() -> Grader:
    return Grader()


@pytest.fixture
def task_cloud(grader: Grader) -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeCloud(answer=grader.answer)).start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cycle_gateway(
    tmp_path: Path, tiny_model_dir: Path, task_cloud: FakeCloudServer
) -> Iterator[Callable[..., RunningGateway]]:
    running: list[RunningGateway] = []
    port = _free_port()

    def start(
        local_limits: dict[str, Any] | None = None, database_url: str | None = None, **policy: Any
    ) -> RunningGateway:
        config = tmp_path / "gateway.yaml"
        config.write_text("{}\n")
        base_policy = {
            "min_samples": 6,
            "promote_after": 3,
            "min_pass_rate": 0.0,
            "cooldown_s": 0,
            "eval_rate": 1.0,
            "window": 6,
            "demote_after": 2,
            "threshold": 70,
            "judge": "upstream",
        }
        settings = load_settings(
            config,
            environ={},
            data_dir=tmp_path / "data",
            database_url=database_url,
            upstream={"base_url": task_cloud.base_url, "retry": {"attempts": 1}},
            local={
                "enabled": True,
                "model": str(tiny_model_dir),
                "port": port,
                "startup_timeout_s": 120,
                "limits": local_limits or {},
            },
            routes=[
                {
                    "name": "task",
                    "match": ["task-*"],
                    "adapt": True,
                    "local_model": str(tiny_model_dir),
                    "policy": {**base_policy, **policy},
                }
            ],
        )
        gateway = start_gateway(settings)
        running.append(gateway)
        gateway.wait_backend_healthy(120)
        return gateway

    yield start
    for gateway in running:
        gateway.stop()


def _client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-task", max_retries=0)


def _ask(gateway: RunningGateway, text: str, **extra: Any) -> tuple[str, str]:
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="task-1", messages=[{"role": "user", "content": text}], max_tokens=8, **extra
    )
    return raw.headers["x-understudy-backend"], raw.parse().choices[0].message.content or ""


def _scrape(gateway: RunningGateway) -> str:
    with urllib.request.urlopen(gateway.url + "/metrics") as response:
        return str(response.read().decode())


def _state(gateway: RunningGateway) -> dict[str, Any]:
    controller = gateway.app.services.controller
    assert controller is not None
    return controller.describe("task")


def _wait_mode(
    gateway: RunningGateway, mode: str, timeout: float = 180, feed: bool = False
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        state = _state(gateway)
        if state["mode"] == mode:
            return state
        assert time.monotonic() < deadline, f"route stuck in {state['mode']}: {state['history'][-3:]}"
        if feed:  # live cloud traffic feeds shadow evaluations
            n += 1
            _ask(gateway, f"feed question {n}")
        time.sleep(0.3)


def _train_to_eval(gateway: RunningGateway) -> dict[str, Any]:
    """Feed enough cloud answers to train; return once the adapter is trained and judged
    (held-out evals can promote it within a second, so `local` counts as past eval too)."""
    for i in range(8):
        backend, answer = _ask(gateway, f"question number {i}")
        assert backend == "cloud" and answer == f"ANSWER: QUESTION NUMBER {i}"
    deadline = time.monotonic() + 240
    while (state := _state(gateway))["mode"] in ("cloud", "training"):
        assert time.monotonic() < deadline, f"never trained: {state['history'][-3:]}"
        time.sleep(0.2)
    assert [h["to"] for h in state["history"]][:2] == ["training", "eval"]
    return state


@pytest.mark.timeout(900)
def test_full_cycle_cloud_training_eval_local_then_spot_check_demotes(
    cycle_gateway: Callable[..., RunningGateway], grader: Grader
) -> None:
    gateway = cycle_gateway()
    assert _state(gateway)["mode"] == "cloud"
    _train_to_eval(gateway)
    state = _wait_mode(gateway, "local", feed=True)
    assert state["active_adapter"] == 1
    assert [h["to"] for h in state["history"]] == ["training", "eval", "local"]

    backend, _ = _ask(gateway, "served locally now?")
    assert backend == "local"
    stream = _client(gateway).chat.completions.create(
        model="task-1", messages=[{"role": "user", "content": "stream it"}], max_tokens=6, stream=True
    )
    assert sum(1 for chunk in stream if chunk.choices) >= 1
    records = gateway.wait_for_records(1, backend="local")
    assert records and all(r["upstream_model"] == "task-v1" for r in records)

    grader.score = 10.0  # quality slips: spot checks (eval_rate 1.0) now fail
    deadline = time.monotonic() + 240  # wall-clock room for a loaded 2-core CI machine
    while _state(gateway)["mode"] == "local":
        assert time.monotonic() < deadline, f"never demoted: {_state(gateway)['history'][-2:]}"
        _ask(gateway, "spot check me")
        time.sleep(0.3)
    state = _state(gateway)
    assert state["mode"] == "cloud"
    assert "spot check" in state["history"][-1]["reason"] or "rolling score" in state["history"][-1]["reason"]
    evals = gateway.app.services.store.list_evals("task", 500)
    phases = {e["phase"] for e in evals}
    assert "spot" in phases and phases & {"heldout", "eval"}  # judged before and after promotion
    assert all(e["adapter_version"] == 1 for e in evals)
    judge_calls = gateway.wait_for_records(1, kind="judge")
    assert judge_calls and all(r["route"] == "task" for r in judge_calls)
    # judge calls never count as user traffic
    assert all(r["kind"] == "user" for r in gateway.wait_for_records(1, kind="user"))


def test_failed_eval_goes_back_to_cloud_and_judge_errors_do_not(
    cycle_gateway: Callable[..., RunningGateway], grader: Grader
) -> None:
    grader.garbage = True  # the grader never answers in JSON: judge errors, not fails
    # A bar of 0.5: five straight fails put the pass rate's upper bound (0.43) below it.
    # After the rejection the retry waits 600 s, so the route stays held back to be seen.
    gateway = cycle_gateway(promote_after=50, min_pass_rate=0.5, cooldown_s=600, retry_after_reject_s=600)
    _train_to_eval(gateway)
    for i in range(4):
        _ask(gateway, f"live question {i}")
    store = gateway.app.services.store
    deadline = time.monotonic() + 120
    while sum(1 for e in store.list_evals("task", 500) if e["error"]) < 2:
        assert time.monotonic() < deadline, "no judge errors recorded"
        time.sleep(0.2)
    assert _state(gateway)["mode"] == "eval"
    grader.garbage, grader.score = False, 5.0
    state = _wait_mode(gateway, "cloud", feed=True, timeout=60)
    assert state["active_adapter"] is None and state["candidate_adapter"] is None
    assert "eval failed" in state["history"][-1]["reason"]
    errors = [e for e in gateway.app.services.store.list_evals("task", 500) if e["error"]]
    assert errors and all(e["passed"] is None for e in errors)
    # held back after a rejection: on the route, on /readyz and in a metric
    assert state["rejections_in_a_row"] == 1 and "1 candidate(s) rejected" in state["held_back"]
    assert 590 < state["next_training_at"] - state["history"][-1]["ts"] <= 600
    with urllib.request.urlopen(gateway.url + "/readyz") as response:
        ready = orjson.loads(response.read())
    assert ready["status"] == "degraded" and any("eval failed" in p for p in ready["problems"])
    assert 'understudy_route_blocked{reason="rejected",route="task"} 1.0' in _scrape(gateway)


@pytest.mark.timeout(600)
def test_an_always_failing_judge_ends_the_eval_at_its_deadline(
    cycle_gateway: Callable[..., RunningGateway], grader: Grader
) -> None:
    grader.garbage = True  # no verdict ever: only the deadline can end this eval
    gateway = cycle_gateway(promote_after=50, eval_timeout_s=6, max_judge_errors=10_000)
    state = _train_to_eval(gateway)
    entered = state["history"][1]["ts"]
    state = _wait_mode(gateway, "cloud", feed=True, timeout=60)
    left = state["history"][-1]
    assert "timed out" in left["reason"] and left["from"] == "eval"
    assert 6 <= left["ts"] - entered < 20
    assert state["candidate_adapter"] is None


def test_pin_failover_and_restart_resume(
    cycle_gateway: Callable[..., RunningGateway], grader: Grader, task_cloud: FakeCloudServer
) -> None:
    gateway = cycle_gateway(local_limits={"max_concurrency": 1, "max_queue": 0})
    _train_to_eval(gateway)
    _wait_mode(gateway, "local", feed=True)

    # locally served requests wait in the local backend's pool: one at a time, none queued
    async def burst() -> list[int]:
        client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="sk-task", max_retries=0)
        ask = {"model": "task-1", "messages": [{"role": "user", "content": "burst"}], "max_tokens": 8}
        answers = await asyncio.gather(
            *(client.chat.completions.with_raw_response.create(**ask) for _ in range(6)),
            return_exceptions=True,
        )
        return [answer.status_code for answer in answers]  # type: ignore[union-attr]

    codes = asyncio.run(burst())
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    assert 'understudy_rate_limited_total{scope="queue:local"}' in _scrape(gateway)

    def post(path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            gateway.url + path,
            data=orjson.dumps(body),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request) as response:
            return orjson.loads(response.read())

    # pin to cloud: the adaptive mode stays local, but the cloud serves
    assert post("/admin/routes/task/mode", {"mode": "cloud"})["pinned"] == "cloud"
    assert _ask(gateway, "pinned?")[0] == "cloud"
    assert post("/admin/routes/task/mode", {"mode": "auto"})["pinned"] is None
    assert _ask(gateway, "unpinned?")[0] == "local"
    post("/admin/routes/task/mode", {"mode": "cloud"})

    # the cloud fails: the adapter that passed eval answers, marked as failover
    task_cloud.cloud.failures["task-1"] = 10**6
    backend, _ = _ask(gateway, "cloud is down")
    assert backend == "failover"
    task_cloud.cloud.failures.clear()
    assert _ask(gateway, "cloud is back")[0] == "cloud"

    # restart: the route resumes exactly where it was
    before = _state(gateway)
    gateway.stop()
    restarted = cycle_gateway()
    after = _state(restarted)
    for key in ("mode", "pinned", "active_adapter", "history", "rolling_score"):
        assert after[key] == before[key], key


@pytest.mark.timeout(600)
def test_a_custom_sqlite_path_trains(
    cycle_gateway: Callable[..., RunningGateway], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`database_url: sqlite:///some/other/path.db`, relative as users write it: the gateway logs
    there and the route's training job reads its pairs from there, not from the data dir."""
    monkeypatch.chdir(tmp_path)  # the gateway, its backend and its jobs run from here
    gateway = cycle_gateway(database_url="sqlite:///some/other/path.db")
    state = _train_to_eval(gateway)
    assert (tmp_path / "some" / "other" / "path.db").is_file()
    assert not (tmp_path / "data" / "understudy.db").exists() and not (tmp_path / "sqlite:").exists()
    meta = orjson.loads((gateway.settings.adapters_root / "task" / "v1" / "meta.json").read_bytes())
    assert meta["sample_count"] == 8  # the eight answers logged above, train and held-out together
    assert state["history"][0]["to"] == "training"
