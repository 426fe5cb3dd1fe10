"""Limits shared through a real redis-server: two gateways enforce one combined limit."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.limits.clock import ManualClock
from gateway.limits.memory import MemoryLimiter
from gateway.limits.rates import Charge, Rate
from gateway.limits.redis import RedisLimiter
from gateway.limits.settings import DEFAULT_BURST_S
from tests.gateway.limits.ratelimit_client import chat, saturate
from tests.gateway.limits.test_limits import keys, metric
from tests.gateway.proxy.test_proxy import socket_closed_port


async def test_two_gateways_enforce_one_combined_limit(gateway_factory: Any, redis_url: str) -> None:
    clock = ManualClock()  # one clock for both, as Redis's own TIME would be
    settings = {"redis_url": redis_url, "auth": keys(alice={"rpm": 600, "tpm": 60_000, "burst_s": 2})}
    first, second = gateway_factory(clock=clock, **settings), gateway_factory(clock=clock, **settings)
    async with aiohttp.ClientSession() as session:
        replies = [await chat(session, gw.url, "sk-alice") for _ in range(15) for gw in (first, second)]
        clock.advance(1.0)
        later = [await chat(session, gw.url, "sk-alice") for _ in range(10) for gw in (first, second)]
    # 600 rpm with a 2 s burst = 20 at once, for both gateways together (alone: 20 each).
    assert sum(r.status == 200 for r in replies) == 20
    assert {r.status for r in replies[:20]} == {200} and {r.status for r in replies[20:]} == {429}
    assert sum(r.status == 200 for r in later) == 10  # refilled at 10 a second
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in replies[:20]]
    assert remaining == list(range(19, -1, -1))  # one counter, whichever gateway answered
    refused_on = {metric(gw, "understudy_rate_limited_total", scope="key:alice") for gw in (first, second)}
    assert refused_on == {10.0}


async def test_shared_rpm_and_tpm_within_5_percent_over_a_simulated_minute(
    gateway_factory: Any, redis_url: str
) -> None:
    clock = ManualClock()
    settings = {
        "redis_url": redis_url,
        "auth": keys(alice={"rpm": 120, "burst_s": 2}, bob={"tpm": 6000, "burst_s": 2}),
    }
    gateways = [gateway_factory(clock=clock, **settings) for _ in range(2)]
    urls = [gw.url for gw in gateways]
    words = " ".join(["w"] * 60)
    async with aiohttp.ClientSession() as session:
        requests = await saturate(session, urls, "sk-alice", clock, 60)
        tokens = await saturate(session, urls, "sk-bob", clock, 60, content=words, max_tokens=400)
    assert abs(len(requests.admitted) - 120) <= 0.05 * 120, len(requests.admitted)
    assert abs(tokens.tokens - 6000) <= 0.05 * 6000, tokens.tokens


async def test_redis_clock_by_default(gateway_factory: Any, redis_url: str) -> None:
    settings = {"redis_url": redis_url, "auth": keys(alice={"rpm": 60, "burst_s": 2})}
    first, second = gateway_factory(**settings), gateway_factory(**settings)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        statuses = [
            (await chat(session, gw.url, "sk-alice")).status for _ in range(4) for gw in (first, second)
        ]
    elapsed = time.monotonic() - started
    # A 2-request burst plus one a second refilled while these ran, across both gateways.
    assert 2 <= statuses.count(200) <= 2 + int(elapsed) + 1, statuses


async def test_unreachable_redis_falls_back_to_per_process_limits(gateway_factory: Any) -> None:
    with socket_closed_port() as port:
        clock = ManualClock()
        gateway = gateway_factory(
            clock=clock, redis_url=f"redis://127.0.0.1:{port}/0", auth=keys(alice={"rpm": 60, "burst_s": 2})
        )
        async with aiohttp.ClientSession() as session:
            statuses = [(await chat(session, gateway.url, "sk-alice")).status for _ in range(3)]
    assert statuses == [200, 200, 429]  # still limited, never a 500


async def test_redis_limiter_is_all_or_nothing(redis_url: str) -> None:
    clock = ManualClock()
    limiter = RedisLimiter(redis_url, clock=clock)
    await limiter.start()
    try:
        requests, tokens = Rate("key:a", "requests", 600, 1.0), Rate("key:a", "tokens", 600, 1.0)
        assert (await limiter.acquire([Charge(requests, 1), Charge(tokens, 8)])).allowed
        refused = await limiter.acquire([Charge(requests, 1), Charge(tokens, 5)])
        assert not refused.allowed and refused.refused_by == tokens
        assert refused.retry_after_s == pytest.approx(0.3)
        assert refused.quotas[0].remaining == 9  # the refusal took no request either
        await limiter.adjust([Charge(tokens, -6)])
        assert (await limiter.acquire([Charge(requests, 1), Charge(tokens, 5)])).allowed
        clock.advance(10)
        assert (await limiter.acquire([Charge(tokens, 25)])).allowed  # oversized: empty bucket only
        assert not (await limiter.acquire([Charge(tokens, 1)])).allowed
        clock.advance(2.5)
        assert (await limiter.acquire([Charge(tokens, 10)])).allowed
    finally:
        await limiter.close()


async def test_two_gateway_processes_share_one_limit(tmp_path: Any, redis_url: str, fake_cloud: Any) -> None:
    """Two real `understudy serve` processes (separate interpreters, real clocks) on one Redis."""
    from tests.gateway.store.test_logging import _start_gateway_process

    extra = (
        f"redis_url: {redis_url}\nauth:\n  keys:\n    - name: alice\n      key: sk-alice\n"
        "      limits: {rpm: 600, burst_s: 2}\n"
    )
    processes = []
    try:
        for name in ("a", "b"):
            workdir = tmp_path / name
            workdir.mkdir()
            processes.append(_start_gateway_process(workdir, fake_cloud.base_url, extra))
        urls = [url for _, url in processes]
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            replies = [await chat(session, url, "sk-alice") for _ in range(20) for url in urls]
        elapsed = time.monotonic() - started
    finally:
        for process, _ in processes:
            process.terminate()
            process.wait()
    admitted = sum(r.status == 200 for r in replies)
    # 600 rpm, 2 s burst: 20 at once for the pair, refilling at 10/s while we send; two
    # separate in-memory limits would have admitted all 40.
    assert 20 <= admitted <= 20 + int(10 * elapsed) + 1, (admitted, elapsed)
    assert admitted < 40
    assert all(r.status in (200, 429) for r in replies)


async def test_redis_and_memory_limiters_agree_step_by_step(redis_url: str) -> None:
    """The Lua script and the in-process buckets, fed one script of charges and clock moves,
    give the same verdicts, waits and remaining counts (default burst, oversized charges,
    corrections)."""
    clock = ManualClock()
    memory, shared = MemoryLimiter(clock), RedisLimiter(redis_url, clock=clock)
    await shared.start()
    requests = Rate("key:a", "requests", 30, DEFAULT_BURST_S)  # holds 5
    tokens = Rate("key:a", "tokens", 1200, 2.0)  # holds 40
    script: list[tuple[str, Any]] = [
        *[("acquire", [Charge(requests, 1), Charge(tokens, 4)])] * 6,
        ("advance", 2.0),
        ("acquire", [Charge(requests, 1), Charge(tokens, 4)]),
        ("acquire", [Charge(requests, 1)]),
        ("advance", 60.0),
        ("acquire", [Charge(tokens, 100)]),  # oversized: fits only the empty bucket
        ("acquire", [Charge(tokens, 1)]),
        ("adjust", [Charge(tokens, -70)]),
        ("acquire", [Charge(requests, 1), Charge(tokens, 10)]),
        ("advance", 0.5),
        ("acquire", [Charge(requests, 1), Charge(tokens, 30)]),
    ]
    try:
        for step, arg in script:
            if step == "advance":
                clock.advance(arg)
            elif step == "adjust":
                await memory.adjust(arg)
                await shared.adjust(arg)
            else:
                mine, theirs = await memory.acquire(arg), await shared.acquire(arg)
                assert mine.allowed == theirs.allowed, (arg, mine, theirs)
                assert mine.refused_by == theirs.refused_by
                assert mine.retry_after_s == pytest.approx(theirs.retry_after_s, abs=1e-3)
                assert [q.remaining for q in mine.quotas] == [q.remaining for q in theirs.quotas]
                assert [q.reset_s for q in mine.quotas] == pytest.approx(
                    [q.reset_s for q in theirs.quotas], abs=1e-3
                )
    finally:
        await shared.close()


async def test_default_burst_is_shared_across_gateways(gateway_factory: Any, redis_url: str) -> None:
    clock = ManualClock()
    settings = {"redis_url": redis_url, "auth": keys(alice={"rpm": 30})}
    first, second = gateway_factory(clock=clock, **settings), gateway_factory(clock=clock, **settings)
    async with aiohttp.ClientSession() as session:
        urls = [first.url, second.url, first.url, second.url, first.url, second.url]
        burst = await asyncio.gather(*(chat(session, url, "sk-alice") for url in urls))
    # rpm 30, default 10 s burst: 5 at once for the pair, wherever they land.
    assert sorted(r.status for r in burst) == [200] * 5 + [429]
