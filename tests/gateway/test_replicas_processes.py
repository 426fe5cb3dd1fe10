"""Two `understudy serve` processes on one PostgreSQL, one redis-server, one shared adapters
volume and one external `understudy backend` (the tiny random Llama), with traffic through the
openai SDK spread over both: their records land in one table, a SIGKILL of one under load loses
no record of a completed answer while the other keeps serving, a route with traffic on both
trains once, and after promotion both serve it locally within 2 s; a pin set on either applies
to both, a restart of both keeps mode, adapter and spend, 10 s without the database lose no
record, and failing spot checks on one replica demote the route for both."""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.store.base import RecordFilter
from gateway.store.postgres import PostgresStore
from tests.conftest import PostgresCluster
from tests.gateway.adaptive.test_cycle import Grader

ROUTE = "task"
KEY = "sk-team-replicas"


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
    name: str

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def route(self) -> dict[str, Any]:
        return dict(_get(f"{self.url}/admin/routes/{ROUTE}"))

    def pin(self, mode: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/admin/routes/{ROUTE}/mode",
            data=orjson.dumps({"mode": mode}),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):  # loopback: no admin key needed
            pass

    def metric(self, name: str) -> float:
        """An unlabelled sample of this replica's /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")


@dataclass
class Cluster:
    database_url: str
    adapters_dir: Path
    backend_url: str
    config: Path
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
        "pricing": {"task-1": {"input": 1.0, "output": 2.0}},  # spend and savings are not 0
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
    log = (tmp_path / f"{name}.log").open("ab")  # a restarted replica appends
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    replica = Replica(process, f"http://127.0.0.1:{port}", data_dir, name)
    _wait_until_up(replica.url + "/readyz", process, 60)
    return replica


@pytest.fixture
def grader() -> Grader:
    return Grader()


@pytest.fixture
def task_cloud(grader: Grader) -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeCloud(answer=grader.answer)).start()
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
    replicas: list[Replica] = []  # the test may restart them in place
    try:
        backend_url = f"http://127.0.0.1:{port}"
        _wait_until_up(backend_url + "/health", backend)
        config = _config(
            tmp_path, task_cloud.base_url, backend_url + "/v1", postgres_url, redis_url, tiny_model_dir
        )
        for name in ("replica-a", "replica-b"):
            replicas.append(_start_replica(tmp_path, name, config))
        yield Cluster(postgres_url, tmp_path / "adapters", backend_url, config, replicas)
    finally:
        started += [replica.process for replica in replicas]
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


def _until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held, polled every 20 ms."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.02)
    return time.monotonic() - started


def _shows(replica: Replica, key: str, value: Any) -> Callable[[], bool]:
    return lambda: replica.route()[key] == value


def _pins_apply_to_both(replicas: list[Replica]) -> None:
    """A pin set through either replica's admin API is seen by the other by polling (1 s)."""
    for setter, other, mode in ((replicas[1], replicas[0], "cloud"), (replicas[0], replicas[1], "auto")):
        setter.pin(mode)
        pinned = None if mode == "auto" else mode
        assert _until(_shows(other, "pinned", pinned), 10, "pin never seen") < 2.0
        answers = asyncio.run(_ask_all([(r, f"pinned {mode}?") for r in replicas], model="task-1"))
        assert [backend for _, backend in answers] == ["local" if mode == "auto" else "cloud"] * 2


def _restart(cluster: Cluster) -> None:
    """Stop both replicas (SIGTERM: each drains its writer) and start them again."""
    for replica in cluster.replicas:
        replica.process.terminate()
    for replica in cluster.replicas:
        # uvicorn re-raises the signal once it has shut down (writer drained)
        assert replica.process.wait(30) in (0, -signal.SIGTERM)
    tmp_path = cluster.config.parent
    cluster.replicas[:] = [_start_replica(tmp_path, r.name, cluster.config) for r in cluster.replicas]


def _ledger(rows: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {
        (r["route"], r["client"], r["backend"], r["kind"], round(r["usd"], 9), r["answers"]) for r in rows
    }


def _restart_keeps_mode_adapter_and_spend(cluster: Cluster) -> None:
    before = [(r.route()["mode"], r.route()["active_adapter"]) for r in cluster.replicas]
    assert before == [("local", 1), ("local", 1)]
    _restart(cluster)
    store = cluster.store()
    try:
        spent = store.cost_totals(by=("route", "client", "backend", "kind"))
    finally:
        store.close()
    usd = {(row["route"], row["kind"]): row["usd"] for row in spent}
    assert usd[(ROUTE, "spend")] > 0 and usd[(ROUTE, "savings")] > 0
    for replica in cluster.replicas:
        assert (replica.route()["mode"], replica.route()["active_adapter"]) == ("local", 1)
        shown = _get(replica.url + "/admin/costs?by=route,client,backend,kind")["data"]
        assert _ledger(shown) == _ledger(spent)
    answers = asyncio.run(_ask_all([(r, "still local?") for r in cluster.replicas], model="task-1"))
    assert [backend for _, backend in answers] == ["local", "local"]


async def _traffic_for(
    replicas: list[Replica], seconds: float, workers: int = 4
) -> tuple[list[str], list[float]]:
    """Requests spread over the replicas for `seconds`: the ids of the completed answers, and
    how long each took."""
    completed: list[str] = []
    took: list[float] = []
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            started = time.monotonic()
            request_id, _ = await _ask(replicas[(index + n) % 2], f"outage {index}.{n}")
            took.append(time.monotonic() - started)
            completed.append(request_id)

    await asyncio.gather(*(worker(index) for index in range(workers)))
    return completed, took


def _logged(cluster: Cluster, request_ids: list[str]) -> set[str]:
    store = cluster.store()
    try:
        rows = store.list_records(RecordFilter(kind="user", route="default"), limit=100_000)
    finally:
        store.close()
    return {row["request_id"] for row in rows} & set(request_ids)


def _database_down_for_10_s(cluster: Cluster, postgres: PostgresCluster) -> None:
    """The database stops (pg_ctl stop -m fast) for 10 s: every request is answered, its record
    waits in the writer's spill, and once the server is back every record lands; none is lost."""
    replicas = cluster.replicas
    postgres.stop("fast")
    try:
        completed, took = asyncio.run(_traffic_for(replicas, 10.0))
        spilled = [replica.metric("understudy_log_queue_depth") for replica in replicas]
    finally:
        postgres.start()
    assert len(completed) >= 20 and all(depth > 0 for depth in spilled), (len(completed), spilled)
    # only the first write to find the server gone waits for a connection; later answers do not
    assert sorted(took)[len(took) // 2] < 0.5, sorted(took)
    _until(lambda: len(_logged(cluster, completed)) == len(completed), 60, "spilled records never landed")
    assert [replica.metric("understudy_log_write_errors_total") for replica in replicas] == [0.0, 0.0]
    assert [replica.metric("understudy_log_queue_depth") for replica in replicas] == [0.0, 0.0]


def _spot_checks_on_one_demote_for_both(replicas: list[Replica], grader: Grader) -> None:
    grader.score = 10.0  # quality slips: spot checks (eval_rate 1.0) now fail
    one, other = replicas
    deadline = time.monotonic() + 120
    n = 0
    while one.route()["mode"] == "local":
        assert time.monotonic() < deadline, one.route()["history"][-2:]
        n += 1
        asyncio.run(_ask(one, f"spot check me {n}", model="task-1"))
        time.sleep(0.2)
    demoted = time.monotonic()
    _until(_shows(other, "mode", "cloud"), 10, "the other replica never saw the demotion")
    assert time.monotonic() - demoted < 2.0
    reason = other.route()["history"][-1]["reason"]
    assert "spot check" in reason or "rolling score" in reason, reason
    answers = asyncio.run(_ask_all([(r, "back to the cloud?") for r in replicas], model="task-1"))
    assert [backend for _, backend in answers] == ["cloud", "cloud"]


@pytest.mark.timeout(600)
def test_a_route_used_on_both_trains_once_and_both_follow_its_state(
    cluster: Cluster, grader: Grader, postgres_cluster: PostgresCluster
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

    _pins_apply_to_both(replicas)
    _restart_keeps_mode_adapter_and_spend(cluster)
    _database_down_for_10_s(cluster, postgres_cluster)
    _spot_checks_on_one_demote_for_both(cluster.replicas, grader)
