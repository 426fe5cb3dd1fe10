"""Soak: 100k requests through a gateway process with logging and limits on. Memory stays flat
after warm-up, tasks and sockets do not grow, and every request has its record.

UNDERSTUDY_SOAK_REQUESTS changes the count (default 100000).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
from pathlib import Path

import aiohttp
import psutil
import pytest

from gateway.demo.fakecloud import FakeCloudServer
from tests.gateway.store.test_logging import _start_gateway_process

TOTAL = int(os.environ.get("UNDERSTUDY_SOAK_REQUESTS", "100000"))
WARMUP = 10_000
CHECKPOINTS = 9
CONCURRENCY = 32
# Limits on, so the rate limiter and the fair wait queue (half the client's concurrency) are
# soaked too.
ROUTE = """routes:
  - name: soak
    match: ["gpt-*"]
    limits: {rpm: 100000000, tpm: 100000000000, max_concurrency: 16, max_queue: 64}
"""


async def _batch(session: aiohttp.ClientSession, url: str, start: int, count: int) -> int:
    """`count` requests at CONCURRENCY; every tenth streamed. Returns how many answered 200
    completely."""
    numbers = iter(range(start, start + count))
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for i in numbers:
            stream = i % 10 == 0
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"n{i}"}]}
            if stream:
                body["stream"] = True
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                payload = await response.read()
                complete = not stream or payload.endswith(b"data: [DONE]\n\n")
                ok += response.status == 200 and complete

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ok


def _scrape(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def _soak(url: str, pid: int) -> tuple[int, list[dict[str, float]]]:
    process = psutil.Process(pid)
    samples: list[dict[str, float]] = []
    answered = 0
    step = (TOTAL - WARMUP) // CHECKPOINTS
    sizes = [WARMUP] + [step] * (CHECKPOINTS - 1) + [TOTAL - WARMUP - step * (CHECKPOINTS - 1)]
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        for size in sizes:
            answered += await _batch(session, url, done, size)
            done += size
            await asyncio.sleep(0.3)  # let the last records and keep-alive timers settle
            async with session.get(url + "/metrics") as response:
                metrics = await response.text()
            samples.append(
                {
                    "requests": done,
                    "rss_mib": process.memory_info().rss / 2**20,
                    "tasks": _scrape(metrics, "understudy_event_loop_tasks"),
                    "sockets": len(process.net_connections(kind="tcp")),
                    "fds": process.num_fds(),
                    "queued": _scrape(metrics, "understudy_log_queue_depth"),
                }
            )
    return answered, samples


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_100k_requests_flat_memory_no_leaks_no_loss(tmp_path: Path, fake_cloud: FakeCloudServer) -> None:
    process, url = _start_gateway_process(tmp_path, fake_cloud.base_url, ROUTE)
    try:
        answered, samples = asyncio.run(_soak(url, process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    for sample in samples:
        print(sample)
    assert answered == TOTAL
    baseline = samples[0]
    for sample in samples[1:]:
        assert sample["rss_mib"] <= baseline["rss_mib"] * 1.10, (baseline, sample)
        assert sample["tasks"] <= baseline["tasks"], (baseline, sample)
        # The upstream pool may still open a few of its CONCURRENCY connections after warm-up;
        # a leak of even one socket in a thousand requests would show as ~90 here.
        assert sample["sockets"] <= baseline["sockets"] + 16, (baseline, sample)
        assert sample["fds"] <= baseline["fds"] + 16, (baseline, sample)
    db = sqlite3.connect(tmp_path / "data" / "understudy.db")
    (count,) = db.execute(
        "SELECT COUNT(*) FROM records WHERE status = 200 AND outcome = 'ok' AND route = 'soak'"
    ).fetchone()
    (distinct,) = db.execute("SELECT COUNT(DISTINCT request_id) FROM records").fetchone()
    assert count == TOTAL and distinct == TOTAL
