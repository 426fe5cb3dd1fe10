"""Faults in the gateway's own world: its disk fills up, its local backend or a training job is
killed with SIGKILL, the gateway itself is killed with SIGKILL under load.

Each fault is real: a small tmpfs really runs out of space (so these tests need root, as CI
has), processes really get SIGKILL. None of the gateway's code is patched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from tests.conftest import GatewayFactory, RunningGateway


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def complete(self) -> bool:
        """A whole answer: a 200 JSON body, or a stream that reached `[DONE]`."""
        if self.status != 200:
            return False
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            return self.body.endswith(b"data: [DONE]\n\n")
        return bool(orjson.loads(self.body).get("choices"))


async def send(
    session: aiohttp.ClientSession,
    url: str,
    text: str,
    stream: bool = False,
    model: str = "gpt-4o-mini",
    **extra: Any,
) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream, **extra}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        payload = await response.read()
    return Reply(response.status, response.headers.copy(), payload)


async def send_many(url: str, texts: list[str], model: str = "gpt-4o-mini") -> list[Reply]:
    """One request per text, all at once, every other one streamed."""
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(
            *(send(session, url, t, stream=i % 2 == 1, model=model) for i, t in enumerate(texts))
        )


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    value = gateway.app.services.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- (a) the store's disk fills up --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that can really fill up (mounting needs root, which CI has)."""
    assert os.geteuid() == 0, "this test mounts a tmpfs: run it as root (CI does)"
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no room left; remove it to give the room back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler


def stored_ids(gateway: RunningGateway) -> set[str]:
    return {r["request_id"] for r in gateway.wait_for_records(0, timeout=0)}


def disk_full_gateway(gateway_factory: GatewayFactory, disk: Path, spill_limit: int) -> RunningGateway:
    gateway = gateway_factory(data_dir=disk / "data", log={"spill_limit": spill_limit})
    before = asyncio.run(send_many(gateway.url, [f"before {i}" for i in range(4)]))
    assert all(r.complete for r in before)
    wait_until(lambda: len(stored_ids(gateway)) == 4, 10, "the first records")
    return gateway


def served_during_outage(gateway: RunningGateway, count: int) -> list[str]:
    """Send `count` requests while the disk is full; all are answered in full. Return their ids."""
    replies = asyncio.run(send_many(gateway.url, [f"during {i}" for i in range(count)]))
    assert all(r.complete for r in replies), [r.body[-200:] for r in replies if not r.complete]
    # The writer retries with back-off: let a retry fail too, then check nothing landed.
    writer = gateway.app.services.writer
    wait_until(lambda: writer.depth == min(count, gateway.settings.log.spill_limit), 10, "the spill")
    time.sleep(1.5)
    assert len(stored_ids(gateway)) == 4
    return [r.headers["x-request-id"] for r in replies]


def test_disk_full_spills_then_writes_every_record(gateway_factory: GatewayFactory, small_disk: Path) -> None:
    gateway = disk_full_gateway(gateway_factory, small_disk, spill_limit=1000)
    filler = fill(small_disk)
    during = served_during_outage(gateway, 30)
    assert metric(gateway, "understudy_log_queue_depth") == 30
    assert metric(gateway, "understudy_log_write_errors_total") == 0

    filler.unlink()  # room again: the next retry writes the spill
    wait_until(lambda: gateway.app.services.writer.depth == 0, 10, "the spill to drain")
    assert set(during) <= stored_ids(gateway) and len(stored_ids(gateway)) == 34
    assert metric(gateway, "understudy_log_write_errors_total") == 0
    after = asyncio.run(send_many(gateway.url, ["after"]))
    assert after[0].complete and after[0].headers["x-request-id"] in stored_ids(gateway)


def test_disk_full_beyond_the_spill_counts_each_lost_record(
    gateway_factory: GatewayFactory, small_disk: Path
) -> None:
    gateway = disk_full_gateway(gateway_factory, small_disk, spill_limit=10)
    filler = fill(small_disk)
    during = served_during_outage(gateway, 30)
    filler.unlink()
    wait_until(lambda: gateway.app.services.writer.depth == 0, 10, "the spill to drain")
    stored = stored_ids(gateway)
    lost = set(during) - stored
    assert len(lost) == 20 and metric(gateway, "understudy_log_write_errors_total") == len(lost)
    assert len(stored) == 4 + 10

    # Stopped while the disk is full: what waits in the spill is counted as lost too.
    fill(small_disk)
    assert all(r.complete for r in asyncio.run(send_many(gateway.url, [f"last {i}" for i in range(5)])))
    gateway.stop()
    assert metric(gateway, "understudy_log_write_errors_total") == 20 + 5


# --- (b) the local backend is killed while it answers -------------------------------------------

ROUTE = "task"


def post(gateway: RunningGateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async def call() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(gateway.url + path, json=body) as response,
        ):
            assert response.status < 300, await response.text()
            return dict(await response.json())

    return asyncio.run(call())


def backend_metric(gateway: RunningGateway, name: str) -> float:
    url = gateway.settings.local_base_url.removesuffix("/v1") + "/metrics"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def backend_pid(gateway: RunningGateway) -> int:
    backend = gateway.app.services.backend
    assert backend is not None and backend.process is not None
    wait_until(backend.healthy.is_set, 120, "the local backend to be healthy", interval=0.2)
    return backend.process.pid


@pytest.fixture
def local_gateway(gateway_factory: GatewayFactory, data_dir: Path, tiny_model_dir: Path) -> RunningGateway:
    """A gateway whose route `task` is served by adapter v1 on a supervised local backend."""
    from tests.local_backend.support import make_lora

    adapter = make_lora(tiny_model_dir, data_dir / "adapters" / ROUTE / "v1", seed=1)
    (adapter / "meta.json").write_text(orjson.dumps({"base_model": str(tiny_model_dir)}).decode())
    gateway = gateway_factory(
        local={"enabled": True, "model": str(tiny_model_dir), "port": free_port(), "threads": 1},
        routes=[
            {
                "name": ROUTE,
                "match": ["task-*"],
                "adapt": True,
                "local_model": str(tiny_model_dir),
                "policy": {"min_samples": 1000, "eval_rate": 0.0},
            }
        ],
    )
    backend_pid(gateway)
    post(gateway, f"/admin/routes/{ROUTE}/adapter", {"version": 1})
    assert post(gateway, f"/admin/routes/{ROUTE}/mode", {"mode": "local"})["serving"] == "local"
    return gateway


def kill_backend_while_it_answers(gateway: RunningGateway, text: str, stream: bool) -> Reply:
    """Send a long local request; SIGKILL the backend once it is generating; the reply."""

    # A stream counts as begun once its first token left the backend: the backend starts an
    # idle job at once, so "a sequence is running" can come before any byte was sent.
    started = "understudy_backend_time_to_first_token_seconds_count" if stream else None

    async def scenario() -> Reply:
        pid = await asyncio.to_thread(backend_pid, gateway)
        first_tokens = await asyncio.to_thread(backend_metric, gateway, started) if started else 0.0
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                send(session, gateway.url, text, stream, model="task-1", max_tokens=400, ignore_eos=True)
            )
            running = "understudy_backend_running_sequences"
            while not await asyncio.to_thread(backend_metric, gateway, running):
                assert not request.done(), "the request ended before the backend was killed"
                await asyncio.sleep(0.01)
            while started and await asyncio.to_thread(backend_metric, gateway, started) <= first_tokens:
                assert not request.done(), "the request ended before the backend was killed"
                await asyncio.sleep(0.01)
            if started:
                await asyncio.sleep(0.1)  # the first chunk on its way through the gateway
            os.kill(pid, signal.SIGKILL)
            return await request

    return asyncio.run(scenario())


def served_locally_again(gateway: RunningGateway, sent: list[Reply]) -> None:
    """Until the restarted backend answers again, every request is answered (by the cloud)."""

    def answered_locally() -> bool:
        (reply,) = asyncio.run(send_many(gateway.url, [f"meanwhile {len(sent)}"], model="task-1"))
        sent.append(reply)
        assert reply.complete, reply.body[-300:]
        return reply.headers["x-understudy-backend"] == "local"

    wait_until(answered_locally, 150, "the local backend to answer again", interval=0.2)


@pytest.mark.timeout(400)
def test_local_backend_killed_mid_request_fails_over_to_the_cloud(local_gateway: RunningGateway) -> None:
    gateway = local_gateway
    (first,) = asyncio.run(send_many(gateway.url, ["warm"], model="task-1"))
    assert first.complete and first.headers["x-understudy-backend"] == "local"

    reply = kill_backend_while_it_answers(gateway, "whole answer", stream=False)
    assert reply.status == 200 and reply.headers["x-understudy-backend"] == "cloud"
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "echo: whole answer"
    meanwhile: list[Reply] = []
    served_locally_again(gateway, meanwhile)

    # A stream the backend already began cannot move to the cloud: it ends with an error event.
    cut = kill_backend_while_it_answers(gateway, "streamed answer", stream=True)
    assert cut.status == 200 and cut.headers["x-understudy-backend"] == "local"
    last = cut.body.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: ")
    assert orjson.loads(last)["error"]["code"] == "upstream_unreachable" and b"[DONE]" not in cut.body
    served_locally_again(gateway, meanwhile)

    records = {r["request_id"]: r for r in gateway.wait_for_records(0, timeout=0)}
    failed_over = records[reply.headers["x-request-id"]]
    assert (failed_over["status"], failed_over["outcome"], failed_over["backend"]) == (200, "ok", "cloud")
    assert "local backend failed" in failed_over["error"]
    cut_record = records[cut.headers["x-request-id"]]
    assert (cut_record["status"], cut_record["outcome"], cut_record["backend"]) == (200, "error", "local")
    for sent in meanwhile:  # each answered and logged, by whichever backend said so
        record = records[sent.headers["x-request-id"]]
        assert record["status"] == 200 and record["backend"] == sent.headers["x-understudy-backend"]
    # while the supervisor restarts it, requests go straight to the cloud, saying why
    by_cloud = [records[s.headers["x-request-id"]] for s in meanwhile]
    assert any(
        "local backend is restarting" in (r["error"] or "") for r in by_cloud if r["backend"] == "cloud"
    )
    assert gateway.app.services.backend is not None and gateway.app.services.backend.restarts == 2


# --- (c) a training job is killed ----------------------------------------------------------------


def route_state(gateway: RunningGateway) -> dict[str, Any]:
    controller = gateway.app.services.controller
    assert controller is not None
    return controller.describe(ROUTE)


@pytest.mark.timeout(300)
def test_trainer_killed_mid_job_sends_the_route_back_to_cloud(
    gateway_factory: GatewayFactory, data_dir: Path, tiny_model_dir: Path
) -> None:
    with socket.socket() as closed:  # an external local backend that is not there: no child
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    gateway = gateway_factory(
        local={"enabled": True, "base_url": nowhere},
        routes=[
            {
                "name": ROUTE,
                "match": ["task-*"],
                "adapt": True,
                "local_model": str(tiny_model_dir),
                "policy": {"min_samples": 4, "cooldown_s": 0},
                # long enough to be killed mid-way, whatever the machine's speed
                "training": {"max_steps": 100_000, "batch_size": 1, "max_length": 64},
            }
        ],
    )
    replies = asyncio.run(send_many(gateway.url, [f"learn {i}" for i in range(4)], model="task-1"))
    job = wait_until(lambda: route_state(gateway)["job"], 20, "the training job to start")
    progress = wait_until(
        lambda: (
            (s := route_state(gateway)["job"]) and s["status"] == "training" and s["current_step"] >= 1 and s
        ),
        180,
        "the job to train",
        interval=0.2,
    )
    replies += asyncio.run(send_many(gateway.url, [f"while training {i}" for i in range(4)], model="task-1"))
    os.kill(progress["pid"], signal.SIGKILL)

    state = wait_until(
        lambda: (s := route_state(gateway))["mode"] == "cloud" and s, 30, "the route to go back"
    )
    final = gateway.app.services.controller.jobs.status(job["job_id"])  # type: ignore[union-attr]
    assert final is not None and final["status"] == "error" and "killed by SIGKILL" in final["message"]
    assert state["job_id"] is None
    assert state["history"][-1]["reason"].startswith("training failed: trainer process was killed by SIGKILL")
    assert "retry after 60 s" in state["history"][-1]["reason"]
    assert metric(gateway, "understudy_training_jobs_total", route=ROUTE, status="error") == 1
    assert not list((data_dir / "adapters" / ROUTE).glob(".staging-*"))  # nothing half-written left

    # It keeps serving, and enough new pairs do not start another job during the back-off.
    replies += asyncio.run(send_many(gateway.url, [f"after {i}" for i in range(6)], model="task-1"))
    assert all(r.complete and r.headers["x-understudy-backend"] == "cloud" for r in replies)
    time.sleep(1.5)  # past the next training check
    assert route_state(gateway)["mode"] == "cloud" and route_state(gateway)["job_id"] is None
    records = gateway.wait_for_records(len(replies), route=ROUTE)
    assert {r["request_id"] for r in records} == {r.headers["x-request-id"] for r in replies}


# --- (d) the gateway itself is killed under load -------------------------------------------------

WORKERS = 32
ENDLESS = 4  # clients in the middle of a stream that never ends when the kill comes
KILL_AFTER = 300  # completed responses


def start_gateway_process(data: Path, upstream: str, port: int) -> subprocess.Popen[bytes]:
    config = data.parent / "gateway.yaml"
    config.write_text(f"upstream:\n  base_url: {upstream}\nlocal:\n  enabled: false\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
        env={**os.environ, "UNDERSTUDY_DATA_DIR": str(data)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        assert process.poll() is None, "the gateway exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        return False

    wait_until(listening, 30, "the gateway to listen")
    return process


@dataclass
class Load:
    completed: list[Reply]
    cut_off: int  # requests in flight when the gateway died


async def load_until_killed(url: str, process: subprocess.Popen[bytes]) -> Load:
    """WORKERS clients send requests back to back (half streamed, answers of ~20 events) and
    ENDLESS clients read endless streams, until the gateway dies; it is killed once
    KILL_AFTER responses are complete."""
    completed: list[Reply] = []
    cut_off = 0
    words = " ".join(f"w{i}" for i in range(20))

    async def worker(session: aiohttp.ClientSession, w: int) -> None:
        nonlocal cut_off
        for i in range(10_000):
            try:
                reply = await send(session, url, f"{w}-{i} {words}", stream=(w + i) % 2 == 0, model="slow-20")
            except (aiohttp.ClientError, TimeoutError):
                cut_off += 1
                return
            if reply.complete:
                completed.append(reply)
                if len(completed) == KILL_AFTER:
                    process.send_signal(signal.SIGKILL)
            else:  # a 200 stream the kill cut short
                cut_off += 1
                return

    async def endless(session: aiohttp.ClientSession) -> None:
        nonlocal cut_off
        with contextlib.suppress(aiohttp.ClientError):
            await send(session, url, "forever", stream=True, model="endless")
        cut_off += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=WORKERS + ENDLESS)) as session:
        await asyncio.gather(
            *(worker(session, w) for w in range(WORKERS)),
            *(endless(session) for _ in range(ENDLESS)),
        )
    return Load(completed, cut_off)


@pytest.mark.timeout(120)
def test_sigkill_under_load_loses_no_completed_response(tmp_path: Path) -> None:
    cloud = FakeCloudServer(FakeCloud(record=False)).start()
    data, port = tmp_path / "data", free_port()
    try:
        process = start_gateway_process(data, cloud.base_url, port)
        try:
            load = asyncio.run(load_until_killed(f"http://127.0.0.1:{port}", process))
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL
        assert load.cut_off == WORKERS + ENDLESS  # every client had a request in flight at the kill
        streamed = sum(1 for r in load.completed if r.headers["content-type"].startswith("text/event-stream"))
        assert len(load.completed) >= KILL_AFTER and 0 < streamed < len(load.completed)

        db = sqlite3.connect(data / "understudy.db")
        stored = {row[0] for row in db.execute("SELECT request_id FROM records WHERE status = 200")}
        missing = {r.headers["x-request-id"] for r in load.completed} - stored
        assert not missing, f"{len(missing)} of {len(load.completed)} completed responses not in the store"
        (before,) = db.execute("SELECT COUNT(*) FROM records").fetchone()

        process = start_gateway_process(data, cloud.base_url, port)  # restarts on the same store
        try:
            after = asyncio.run(send_many(f"http://127.0.0.1:{port}", [f"after {i}" for i in range(10)]))
        finally:
            process.terminate()
            process.wait()
        assert all(r.complete for r in after)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        ids = {row[0] for row in db.execute("SELECT request_id FROM records")}
        assert {r.headers["x-request-id"] for r in after} <= ids and len(ids) == before + 10
    finally:
        cloud.stop()
