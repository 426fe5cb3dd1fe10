"""Who answers on a route the local model serves: a real gateway supervising the real local
backend (tiny random Llama with a seeded LoRA as the route's promoted adapter), and the fake
cloud, which refuses what the real API refuses."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import load_settings
from gateway.store.sqlite import SQLiteStore
from tests.conftest import RunningGateway, start_gateway
from tests.local_backend.support import free_port, make_lora

ROUTE = "task"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def _grade_low(body: dict[str, Any]) -> str:
    system = body["messages"][0].get("content") if body.get("messages") else ""
    if "strict grader" in str(system):
        return orjson.dumps({"similarity": 5, "precision": 5, "reason": "wrong"}).decode()
    return "the cloud's answer"


@pytest.fixture
def cloud() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeCloud(answer=_grade_low)).start()
    yield server
    server.stop()


def _seed(
    data_dir: Path, tiny_model_dir: Path, heldout_pairs: int = 3, state: dict[str, Any] | None = None
) -> None:
    folder = data_dir / "adapters" / ROUTE / "v1"
    make_lora(tiny_model_dir, folder, seed=3)
    meta = {"base_model": str(tiny_model_dir), "sample_count": 40, "trained_with_tools": False}
    (folder / "meta.json").write_text(orjson.dumps(meta).decode())
    heldout = [
        {"messages": [{"role": "user", "content": f"held out {i}"}, {"role": "assistant", "content": "x"}]}
        for i in range(heldout_pairs)
    ]
    (folder / "heldout.jsonl").write_text("".join(orjson.dumps(line).decode() + "\n" for line in heldout))
    store = SQLiteStore(data_dir / "understudy.db")
    store.open()
    store.save_route_state(ROUTE, state or {"route": ROUTE, "mode": "local", "active_version": 1})
    store.close()


@pytest.fixture
def served_route(
    tmp_path: Path, tiny_model_dir: Path, cloud: FakeCloudServer
) -> Iterator[Callable[..., RunningGateway]]:
    running: list[RunningGateway] = []

    def start(seed: dict[str, Any] | None = None, **policy: Any) -> RunningGateway:
        data_dir = tmp_path / "data"
        _seed(data_dir, tiny_model_dir, **(seed or {}))
        config = tmp_path / "gateway.yaml"
        config.write_text("{}\n")
        settings = load_settings(
            config,
            environ={},
            data_dir=data_dir,
            upstream={"base_url": cloud.base_url, "retry": {"attempts": 1}},
            local={
                "enabled": True,
                "model": str(tiny_model_dir),
                "port": free_port(),
                "startup_timeout_s": 120,
            },
            routes=[
                {
                    "name": ROUTE,
                    "match": ["task-*"],
                    "adapt": True,
                    "local_model": str(tiny_model_dir),
                    "policy": {"eval_rate": 0.0, "min_samples": 10_000, "judge": "upstream", **policy},
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


def _chat(gateway: RunningGateway, content: Any, key: str = "sk-a", **extra: Any) -> str:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="task-1", messages=[{"role": "user", "content": content}], **{"max_tokens": 6, **extra}
    )
    raw.parse()
    return str(raw.headers["x-understudy-backend"])


def _metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    with urllib.request.urlopen(gateway.url + "/metrics") as response:
        text = response.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not scraped")


def test_requests_the_local_model_cannot_serve_go_to_the_cloud(
    served_route: Callable[..., RunningGateway],
) -> None:
    gateway = served_route()
    assert _chat(gateway, "plain text") == "local"
    excluded = {
        "non_text_content": lambda: _chat(gateway, [{"type": "text", "text": "what is this?"}, IMAGE]),
        "unsupported_parameter": lambda: _chat(gateway, "hi", logprobs=True, top_logprobs=2),
        "context_length": lambda: _chat(gateway, "hi", max_tokens=100_000),
        "tools_mismatch": lambda: _chat(gateway, "hi", tools=[TOOL], tool_choice="auto"),
    }
    for reason, ask in excluded.items():
        assert ask() == "cloud", reason
        assert _metric(gateway, "understudy_local_skipped_total", route=ROUTE, reason=reason) == 1
    # `logprobs: false` asks for nothing the local model lacks; `tool_choice: none` offers no tool.
    assert _chat(gateway, "hi", logprobs=False) == "local"
    assert _chat(gateway, "hi", tools=[TOOL], tool_choice="none") == "local"
    records = gateway.wait_for_records(7, route=ROUTE)
    skips = {r["local_skip"] for r in records if r["backend"] == "cloud"}
    assert set(excluded) <= skips


def test_a_local_4xx_falls_back_to_the_cloud(served_route: Callable[..., RunningGateway]) -> None:
    gateway = served_route()
    # The local backend takes n ≤ 16 (it answers 4xx); the cloud takes more.
    assert _chat(gateway, "many answers", n=20) == "cloud"
    assert _metric(gateway, "understudy_local_fallbacks_total", route=ROUTE, reason="status_4xx") == 1
    (record,) = gateway.wait_for_records(1, route=ROUTE)
    assert record["status"] == 200 and record["local_skip"] == "fallback:status_4xx"
    assert "local backend failed" in record["error"]


def test_spot_checks_on_streamed_traffic_still_demote(
    served_route: Callable[..., RunningGateway], cloud: FakeCloudServer
) -> None:
    """The client streams and asks for usage; the spot check re-asks the cloud without the
    stream-only fields (the fake, like OpenAI, refuses stream_options on a plain request)."""
    gateway = served_route(eval_rate=1.0, demote_after=2, window=4, threshold=70)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-a", max_retries=0)
    deadline = time.monotonic() + 60
    i = 0
    while gateway.app.services.controller.runtime(ROUTE).state.mode == "local":  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "spot checks never demoted the route"
        stream = client.chat.completions.create(
            model="task-1",
            messages=[{"role": "user", "content": f"streamed question {i}"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert any(chunk.usage for chunk in stream)
        i += 1
        time.sleep(0.3)
    shadows = [
        r
        for r in cloud.cloud.requests
        if r.json().get("messages", [{}])[-1].get("content", "").startswith("streamed")
    ]
    assert shadows and all("stream_options" not in r.json() and not r.json().get("stream") for r in shadows)
    state = gateway.app.services.controller.describe(ROUTE)  # type: ignore[union-attr]
    reason = state["history"][-1]["reason"]
    assert state["mode"] == "cloud" and ("rolling score" in reason or "spot checks" in reason)


def test_each_client_key_pays_only_for_its_own_spot_checks(
    served_route: Callable[..., RunningGateway], cloud: FakeCloudServer
) -> None:
    gateway = served_route(eval_rate=1.0, demote_after=50, window=50, threshold=0)

    def judged(word: str) -> int:
        return sum(1 for r in cloud.cloud.requests if b"strict grader" in r.body and word.encode() in r.body)

    deadline = time.monotonic() + 90
    i = 0
    while judged("alpha") < 2 or judged("beta") < 2:  # spot checks beyond free slots are skipped
        assert time.monotonic() < deadline, "the spot checks were never judged"
        assert _chat(gateway, f"alpha question {i}", key="sk-alpha") == "local"
        assert _chat(gateway, f"beta question {i}", key="sk-beta") == "local"
        i += 1
        time.sleep(0.5)
    for seen in cloud.cloud.requests:
        body = seen.body.decode()
        key = "sk-alpha" if "alpha question" in body else "sk-beta"
        assert ("alpha question" in body) != ("beta question" in body)
        assert seen.headers["authorization"] == f"Bearer {key}", body[:200]


def test_a_manual_eval_judges_the_serving_adapter_on_its_held_out_split(
    served_route: Callable[..., RunningGateway],
) -> None:
    gateway = served_route(judge="exact")
    request = urllib.request.Request(gateway.url + "/admin/routes/task/eval", method="POST", data=b"{}")
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request) as response:
        assert response.status == 202
    store = gateway.app.services.store
    deadline = time.monotonic() + 60
    while len(rows := [e for e in store.list_evals(ROUTE, 50) if e["phase"] == "heldout"]) < 3:
        assert time.monotonic() < deadline, "the held-out eval never ran on the local route"
        time.sleep(0.2)
    assert {row["adapter_version"] for row in rows} == {1}
    assert all(row["passed"] is not None for row in rows)
    assert gateway.app.services.controller.describe(ROUTE)["mode"] == "local"  # type: ignore[union-attr]


def test_the_held_out_eval_stops_once_eval_has_decided(
    served_route: Callable[..., RunningGateway],
) -> None:
    # A candidate with a big held-out split (a fifth of a long log): three verdicts decide
    # (a bar of 0 promotes on promote_after alone), and the other 37 samples are neither
    # generated nor judged once the adapter serves.
    candidate = {"route": ROUTE, "mode": "eval", "candidate_version": 1, "eval_started_at": time.time()}
    gateway = served_route(
        seed={"heldout_pairs": 40, "state": candidate}, judge="exact", promote_after=3, min_pass_rate=0.0
    )
    request = urllib.request.Request(gateway.url + "/admin/routes/task/eval", method="POST", data=b"{}")
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request) as response:
        assert response.status == 202
    controller = gateway.app.services.controller
    assert controller is not None
    deadline = time.monotonic() + 60
    while controller.describe(ROUTE)["mode"] == "eval":
        assert time.monotonic() < deadline, "eval never decided"
        time.sleep(0.2)
    assert controller.describe(ROUTE)["mode"] == "local"
    time.sleep(3)  # a held-out loop that went on would have judged more by now
    judged = [e for e in gateway.app.services.store.list_evals(ROUTE, 100) if e["phase"] == "heldout"]
    assert len(judged) == 3
