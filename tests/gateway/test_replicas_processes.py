"""Two `understudy serve` processes on one PostgreSQL, one redis-server, one shared adapters
volume and one external `understudy backend` (the tiny random Llama), with traffic through the
openai SDK spread over both: their records land in one table, a SIGKILL of one under load loses
no record of a completed answer while the other keeps serving, a route with traffic on both
trains once, and after promotion both serve it locally within 2 s."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.store.base import RecordFilter
from gateway.store.postgres import PostgresStore

ROUTE = "task"
KEY = "sk-team-replicas"


def _answer(body: dict[str, Any]) -> str:
    """The task (upper-case the question) and, asked as the upstream judge, a passing grade."""
    system = body["messages"][0]["content"] if body.get("messages") else ""
    if "strict grader" in str(system):
        return orjson.dumps({"similarity": 90, "precision": 90, "reason": "scripted"}).decode()
    return f"ANSWER: {str(body['messages'][-1]['content']).upper()}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read() or b"null")


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"{url} exited with {process.returncode}"
        try:
            _get(url)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def route(self) -> dict[str, Any]:
        return dict(_get(f"{self.url}/admin/routes/{ROUTE}"))


@dataclass
class Cluster:
    database_url: str
    adapters_dir: Path
    backend_url: str
    replicas: list[Replica] = field(default_factory=list)

    def store(self) -> PostgresStore:
        store = PostgresStore(self.database_url)
        store.open()
        return store


def _config(tmp_path: Path, cloud: str, backend: str, database_url: str, redis_url: str, model: Path) -> Path:
    config = {
        "database_url": database_url,
        "redis_url": redis_url,  # the client key's limit is one counter for both replicas
        "adapters_dir": str(tmp_path / "adapters"),
        "upstream": {"base_url": cloud, "api_key": "sk-upstream", "retry": {"attempts": 1}},
        "local": {"enabled": True, "base_url": backend},
        "auth": {"keys": [{"name": "team", "key": KEY, "limits": {"rpm": 100_000}}]},
        "routes": [
            {
                "name": ROUTE,
                "match": ["task-*"],
                "adapt": True,
                "local_model": str(model),
                "policy": {
                    "min_samples": 6,
                    "promote_after": 3,
                    "min_pass_rate": 0.0,
                    "cooldown_s": 0,
                    "eval_rate": 1.0,
                    "window": 6,
                    "threshold": 70,
                    "judge": "upstream",
                },
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    return path


def _start_replica(tmp_path: Path, name: str, config: Path) -> Replica:
    port = _free_port()
    data_dir = tmp_path / name
    env = {**os.environ, "UNDERSTUDY_DATA_DIR": str(data_dir)}
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    replica = Replica(process, f"http://127.0.0.1:{port}", data_dir)
    _wait_until_up(replica.url + "/readyz", process, 60)
    return replica


@pytest.fixture
def task_cloud() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeCloud(answer=_answer)).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(
    tmp_path: Path, tiny_model_dir: Path, task_cloud: FakeCloudServer, postgres_url: str, redis_url: str
) -> Iterator[Cluster]:
    port = _free_port()
    backend_argv = [
        sys.executable,
        "-m",
        "local_backend",
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
    ]
    backend_argv += ["--data-dir", str(tmp_path / "backend"), "--threads", "1"]
    backend_log = (tmp_path / "backend.log").open("wb")
    backend = subprocess.Popen(backend_argv, stdout=backend_log, stderr=subprocess.STDOUT)
    started: list[subprocess.Popen[bytes]] = [backend]
    try:
        backend_url = f"http://127.0.0.1:{port}"
        _wait_until_up(backend_url + "/health", backend)
        config = _config(
            tmp_path, task_cloud.base_url, backend_url + "/v1", postgres_url, redis_url, tiny_model_dir
        )
        found = Cluster(postgres_url, tmp_path / "adapters", backend_url)
        for name in ("replica-a", "replica-b"):
            found.replicas.append(_start_replica(tmp_path, name, config))
            started.append(found.replicas[-1].process)
        yield found
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def _ask(replica: Replica, text: str, model: str = "gpt-4o-mini") -> tuple[str, str]:
    """(request id, backend) of one answered chat completion."""
    async with replica.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=8
        )
    raw.parse()
    return raw.headers["x-request-id"], raw.headers["x-understudy-backend"]


async def _ask_all(asks: list[tuple[Replica, str]], model: str = "gpt-4o-mini") -> list[tuple[str, str]]:
    return list(await asyncio.gather(*(_ask(replica, text, model) for replica, text in asks)))


async def _load(replicas: list[Replica], total: int, kill_after: int) -> tuple[dict[str, int], int]:
    """`total` requests spread over the replicas by 8 workers; SIGKILL the first replica once
    `kill_after` answers completed. Returns which replica completed each answer (by request
    id) and how many requests failed."""
    completed: dict[str, int] = {}
    failed = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(total):
        queue.put_nowait(n)

    async def worker() -> None:
        nonlocal failed
        while not queue.empty():
            n = queue.get_nowait()
            try:
                request_id, _ = await _ask(replicas[n % 2], f"load {n}")
            except openai.APIError:
                failed += 1
                continue
            completed[request_id] = n % 2
            if len(completed) == kill_after:
                replicas[0].process.send_signal(signal.SIGKILL)

    await asyncio.gather(*(worker() for _ in range(8)))
    return completed, failed


@pytest.mark.timeout(600)
def test_both_replicas_log_to_one_table_and_a_sigkill_loses_no_completed_record(cluster: Cluster) -> None:
    completed, failed = asyncio.run(_load(cluster.replicas, total=160, kill_after=50))
    cluster.replicas[0].process.wait(10)
    assert len(completed) + failed == 160 and failed > 0  # the killed replica's share failed
    survivor = cluster.replicas[1]
    after = asyncio.run(_ask_all([(survivor, f"after {n}") for n in range(10)]))
    assert {backend for _, backend in after} == {"cloud"}
    store = cluster.store()
    try:
        rows = store.list_records(RecordFilter(kind="user"), limit=10_000)
        costs = store.cost_totals(by=("client", "kind"))
    finally:
        store.close()
    logged = {row["request_id"] for row in rows if row["status"] == 200}
    by_a = {request_id for request_id, index in completed.items() if index == 0}
    by_b = {request_id for request_id, index in completed.items() if index == 1}
    assert len(by_a) >= 20 and len(by_b) >= 20  # both took their share before the kill
    assert by_a <= logged and by_b <= logged and {request_id for request_id, _ in after} <= logged
    assert len(rows) == len({row["request_id"] for row in rows})  # one record per answer
    # one ledger for both, by client key name; the killed replica may lose its last 0.5 s
    [spend] = costs
    assert (spend["client"], spend["kind"]) == ("team", "spend")
    assert len(by_b) + len(after) <= spend["answers"] <= len(completed) + len(after)


def _wait_until_local(replicas: list[Replica], timeout: float) -> tuple[float, float]:
    """When each replica first reported the route `local` (monotonic seconds), feeding live
    traffic (which the candidate answers in the shadow during eval) to both meanwhile."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    fed = 0.0
    while len(seen) < len(replicas):
        assert time.monotonic() < deadline, [r.route()["history"][-3:] for r in replicas]
        for index, replica in enumerate(replicas):
            if index not in seen and replica.route()["mode"] == "local":
                seen[index] = time.monotonic()
        if not seen and time.monotonic() > fed + 0.5:
            fed = time.monotonic()
            asyncio.run(_ask(replicas[int(fed * 2) % 2], f"feed {fed}", model="task-1"))
        time.sleep(0.05)
    return seen[0], seen[1]


@pytest.mark.timeout(600)
def test_a_route_used_on_both_trains_once_and_both_serve_it_locally_after_promotion(
    cluster: Cluster,
) -> None:
    replicas = cluster.replicas

    asks = [(replicas[n % 2], f"question number {n}") for n in range(12)]
    assert {backend for _, backend in asyncio.run(_ask_all(asks, model="task-1"))} == {"cloud"}
    first, second = _wait_until_local(replicas, timeout=300)
    assert abs(first - second) < 2.0  # the other replica saw the promotion by polling the version
    answers = asyncio.run(_ask_all([(r, "served locally?") for r in replicas], model="task-1"))
    assert [backend for _, backend in answers] == ["local", "local"]

    jobs = [path for replica in replicas for path in (replica.data_dir / "jobs").glob("*.json")]
    assert len(jobs) == 1, jobs  # one lease: one replica trained the route for both
    versions = sorted(path.name for path in (cluster.adapters_dir / ROUTE).iterdir())
    assert versions == ["v1"]  # on the shared volume, not in either replica's data dir
    assert not any((replica.data_dir / "adapters").exists() for replica in replicas)
    # both replicas asked the one backend for the adapter; the second load was a no-op
    loaded = [m["id"] for m in _get(cluster.backend_url + "/v1/models")["data"]]
    assert loaded.count(f"{ROUTE}-v1") == 1
    assert all(replica.route()["active_adapter"] == 1 for replica in replicas)
