"""Every /v1/* request is logged, durably, with streams assembled and no secrets stored."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.demo.fakecloud import FakeCloudServer


def test_mixed_batch_logs_exactly_one_record_per_request(client: Any, gateway: Any) -> None:
    for i in range(5):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}])
    for i in range(4):
        list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"s{i}"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    client.embeddings.create(model="text-embedding-3-small", input="x")
    client.models.list()
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="error-500", messages=[{"role": "user", "content": "x"}])
    records = gateway.wait_for_records(12)
    time.sleep(0.2)
    records = gateway.wait_for_records(12)
    assert len(records) == 12
    streams = [r for r in records if r["stream"]]
    assert len(streams) == 4
    for record in streams:
        assert record["response"]["object"] == "chat.completion"
        assert record["response"]["choices"][0]["message"]["content"].startswith("echo: s")
        assert record["usage"]["completion_tokens"] == 2
        assert record["ttft_ms"] is not None and record["ttft_ms"] <= record["latency_ms"]
    endpoints = sorted(r["endpoint"] for r in records)
    assert endpoints.count("/v1/chat/completions") == 10
    assert "/v1/embeddings" in endpoints and "/v1/models" in endpoints
    chat = next(r for r in records if not r["stream"] and r["status"] == 200 and r["model"] == "gpt-4o-mini")
    assert chat["request"]["messages"][0]["role"] == "user"
    assert chat["prompt_tokens"] and chat["completion_tokens"] == 2


def test_secrets_never_stored(client: Any, gateway: Any) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    gateway.wait_for_records(1)
    gateway.stop()
    for path in Path(gateway.settings.data_dir).glob("understudy.db*"):
        assert b"sk-client-secret-123" not in path.read_bytes()


async def test_disconnect_mid_stream_is_logged_with_what_was_sent(gateway: Any) -> None:
    body = {"model": "endless", "messages": [{"role": "user", "content": "go"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.url + "/v1/chat/completions", json=body)
        received = b""
        while received.count(b"more") < 5:
            received += await response.content.readany()
        response.close()
    (record,) = await asyncio.to_thread(gateway.wait_for_records, 1)
    assert record["outcome"] == "disconnected"
    content = record["response"]["choices"][0]["message"]["content"]
    assert content.startswith("echo: go more")


async def test_stream_cut_by_upstream_ends_with_error_event(gateway: Any) -> None:
    body = {"model": "cut", "messages": [{"role": "user", "content": "a b c d e f g h"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        text = (await response.read()).decode()
    assert response.status == 200
    assert '"upstream_unreachable"' in text.splitlines()[-2]  # the SSE error event, last
    assert "[DONE]" not in text
    (record,) = await asyncio.to_thread(gateway.wait_for_records, 1)
    assert record["outcome"] == "error"
    assert record["response"]["choices"][0]["message"]["content"].startswith("echo: a b")


def test_clean_stop_drains_every_record(gateway: Any, client: Any) -> None:
    for i in range(20):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"{i}"}])
    gateway.stop()
    db = sqlite3.connect(Path(gateway.settings.data_dir) / "understudy.db")
    assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_gateway_process(
    tmp_path: Path, upstream: str, extra_config: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"upstream:\n  base_url: {upstream}\nlocal:\n  enabled: false\n{extra_config}")
    env = {**os.environ, "UNDERSTUDY_DATA_DIR": str(tmp_path / "data")}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    return process, url


async def _hammer(url: str, count: int) -> int:
    async def one(session: aiohttp.ClientSession, i: int) -> bool:
        stream = i % 2 == 0
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"n{i}"}], "stream": stream}
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            payload = await response.read()
            return response.status == 200 and (not stream or payload.endswith(b"data: [DONE]\n\n"))

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i) for i in range(count)))
    return sum(results)


def test_sigkill_right_after_responses_loses_nothing(tmp_path: Path, fake_cloud: FakeCloudServer) -> None:
    process, url = _start_gateway_process(tmp_path, fake_cloud.base_url)
    try:
        completed = asyncio.run(_hammer(url, 200))
    finally:
        process.send_signal(signal.SIGKILL)  # the instant the last reply arrived
        process.wait()
    assert completed == 200
    db = sqlite3.connect(tmp_path / "data" / "understudy.db")
    (count,) = db.execute("SELECT COUNT(*) FROM records WHERE status = 200").fetchone()
    assert count == 200
    # and the restarted gateway keeps appending to the same store
    process, url = _start_gateway_process(tmp_path, fake_cloud.base_url)
    try:
        assert asyncio.run(_hammer(url, 10)) == 10
    finally:
        process.terminate()
        process.wait()
    (count,) = db.execute("SELECT COUNT(*) FROM records").fetchone()
    assert count == 210
