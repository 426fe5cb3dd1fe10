"""Client keys, RPM/TPM limits and fair concurrency pools, against a real gateway and fake
cloud. Rate limits run on an injected manual clock: a minute passes in milliseconds."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.demo.fakecloud import FakeCloudServer
from gateway.domain.exchange import Exchange
from gateway.domain.view import RequestView
from gateway.errors import Overloaded
from gateway.limits.clock import ManualClock
from gateway.limits.guard import Guard
from gateway.limits.headers import format_reset, merge_rate_limit_headers
from gateway.limits.memory import MemoryLimiter
from gateway.limits.rates import Charge, Rate
from gateway.limits.settings import DEFAULT_BURST_S
from gateway.limits.tokens import estimate_tokens
from gateway.metrics import Metrics
from gateway.settings import ConfigError, load_settings
from tests.gateway.limits.ratelimit_client import chat, saturate


def keys(**limits_by_name: dict[str, Any]) -> dict[str, Any]:
    """`auth` settings with one key per name (the key is `sk-<name>`)."""
    return {"keys": [{"name": n, "key": f"sk-{n}", "limits": lim} for n, lim in limits_by_name.items()]}


def metric(gateway: Any, name: str, **labels: str) -> float:
    value = gateway.app.services.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- keys -----------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_plain_keys_hashed_at_load(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-bob").hexdigest()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "auth:\n  keys:\n    - {name: alice, key: '${ALICE_KEY}', limits: {rpm: 5}}\n"
        f"    - {{name: bob, key_sha256: {digest}}}\n"
    )
    settings = load_settings(config, environ={"ALICE_KEY": "sk-alice"})
    alice, bob = settings.auth.keys
    assert alice.key_sha256 == hashlib.sha256(b"sk-alice").hexdigest()
    assert "sk-alice" not in settings.model_dump_json()
    assert bob.key_sha256 == digest and alice.limits.rpm == 5
    with pytest.raises(ConfigError, match="key is empty"):
        load_settings(config, environ={})
    config.write_text("auth:\n  keys:\n    - {name: a, key: x, limits: {rpmm: 1}}\n")
    with pytest.raises(ConfigError, match=r"auth\.keys\.0\.limits\.rpmm: unknown key"):
        load_settings(config, environ={})


async def test_unknown_or_missing_key_is_401_in_openai_shape(gateway_factory: Any) -> None:
    gateway = gateway_factory(auth=keys(alice={}))
    async with aiohttp.ClientSession() as session:
        unknown = await chat(session, gateway.url, "sk-mallory")
        missing = await chat(session, gateway.url, None)
        known = await chat(session, gateway.url, "sk-alice")
    assert unknown.status == 401 and unknown.body["error"]["code"] == "invalid_api_key"
    assert unknown.body["error"]["type"] == "authentication_error"
    assert missing.status == 401 and missing.body["error"]["code"] == "missing_api_key"
    assert known.status == 200
    assert "x-ratelimit-limit-requests" not in known.headers  # the key has no limits


def test_client_key_is_not_forwarded_and_its_name_is_logged(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(auth=keys(alice={}))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-alice", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert "Authorization" not in fake_cloud.cloud.requests[-1].headers
    upstream_keyed = gateway_factory(
        auth=keys(alice={}), upstream={"base_url": fake_cloud.base_url, "api_key": "sk-upstream"}
    )
    client = openai.OpenAI(base_url=upstream_keyed.url + "/v1", api_key="sk-alice", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert fake_cloud.cloud.requests[-1].headers["Authorization"] == "Bearer sk-upstream"
    records = upstream_keyed.wait_for_records(2)  # both gateways share the data dir
    assert [r["client"] for r in records] == ["alice", "alice"]
    assert "sk-alice" not in json.dumps(records)


# --- rates ----------------------------------------------------------------------------------


async def test_rpm_per_key_within_5_percent_over_a_simulated_minute(gateway_factory: Any) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock, auth=keys(alice={"rpm": 120, "burst_s": 2}, bob={"rpm": 600}))
    async with aiohttp.ClientSession() as session:
        first = await saturate(session, [gateway.url], "sk-alice", clock, 60)
        second = await saturate(session, [gateway.url], "sk-alice", clock, 60)
        # Another key has its own budget, untouched by alice's.
        bob = await chat(session, gateway.url, "sk-bob")
    # From cold the burst (2 s worth) comes on top; the steady minute is the limit itself.
    assert abs(len(first.admitted) - 120) <= 0.05 * 120, len(first.admitted)
    assert abs(len(second.admitted) - 120) <= 1, len(second.admitted)
    assert first.refused > 0
    assert bob.status == 200
    assert (
        metric(gateway, "understudy_rate_limited_total", scope="key:alice") == first.refused + second.refused
    )


async def test_tpm_per_key_within_5_percent_settled_on_real_usage(gateway_factory: Any) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock, auth=keys(alice={"tpm": 6000, "burst_s": 2}))
    words = " ".join(["w"] * 60)
    async with aiohttp.ClientSession() as session:
        result = await saturate(session, [gateway.url], "sk-alice", clock, 60, content=words, max_tokens=400)
    # Each call is estimated at ~430 tokens (max_tokens + text/4) but uses ~121: charged on
    # the estimate alone, only ~14 calls (1,700 tokens) would have fit in the minute.
    per_call = result.admitted[0].used_tokens
    assert (
        per_call
        < 200
        < estimate_tokens("/v1/chat/completions", {"messages": [{"content": words}], "max_tokens": 400})
    )
    assert abs(result.tokens - 6000) <= 0.05 * 6000, result.tokens


async def test_rate_limit_headers_present_decreasing_and_tightest(gateway_factory: Any) -> None:
    clock = ManualClock()
    gateway = gateway_factory(
        clock=clock,
        auth=keys(alice={"rpm": 600, "tpm": 100_000, "burst_s": 2}),
        routes=[{"name": "narrow", "match": ["narrow-*"], "limits": {"rpm": 300, "burst_s": 2}}],
    )
    async with aiohttp.ClientSession() as session:
        wide = [await chat(session, gateway.url, "sk-alice") for _ in range(3)]
        narrow = [await chat(session, gateway.url, "sk-alice", model="narrow-1") for _ in range(3)]
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in wide]
    assert remaining == [19, 18, 17]  # 600 rpm, 2 s burst = 20
    assert {r.headers["x-ratelimit-limit-requests"] for r in wide} == {"600"}
    tokens = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in wide]
    assert tokens[0] > tokens[1] > tokens[2] and wide[0].headers["x-ratelimit-limit-tokens"] == "100000"
    assert all(r.headers["x-ratelimit-reset-requests"].endswith("ms") for r in wide)
    # The route's 300 rpm (burst 10) is tighter than the key's for these requests.
    assert [r.headers["x-ratelimit-limit-requests"] for r in narrow] == ["300"] * 3
    assert [int(r.headers["x-ratelimit-remaining-requests"]) for r in narrow] == [9, 8, 7]


def test_default_burst_is_ten_seconds_of_the_rate() -> None:
    assert Rate("key:a", "requests", 30, DEFAULT_BURST_S).capacity == 5  # 30 x 10 / 60
    assert Rate("key:a", "requests", 600, DEFAULT_BURST_S).capacity == 100
    assert Rate("key:a", "requests", 3, DEFAULT_BURST_S).capacity == 1  # never below one
    assert Rate("key:a", "requests", 30, 2.0).capacity == 1  # an explicit burst_s overrides


async def test_five_parallel_requests_a_minute_pass_at_rpm_30_and_the_rate_still_holds(
    gateway_factory: Any,
) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock, auth=keys(alice={"rpm": 30}))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # an app that fires 5 at once, once a minute
            burst = await asyncio.gather(*(chat(session, gateway.url, "sk-alice") for _ in range(5)))
            assert [r.status for r in burst] == [200] * 5
            clock.advance(60)
        sixth = [await chat(session, gateway.url, "sk-alice") for _ in range(6)]
        assert [r.status for r in sixth] == [200] * 5 + [429]
        assert sixth[5].headers["retry-after-ms"] == "2000"  # one request drains every 2 s
        clock.advance(60)
        first = await saturate(session, [gateway.url], "sk-alice", clock, 60)
        second = await saturate(session, [gateway.url], "sk-alice", clock, 60)
    # Over any minute at most rpm + the burst; saturated minute after minute, the rate itself.
    assert len(first.admitted) <= 30 + 5 + 1, len(first.admitted)
    assert abs(len(second.admitted) - 30) <= 1, len(second.admitted)


async def test_over_the_limit_is_429_with_retry_after_and_headers(gateway_factory: Any) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock, routes=[{"name": "default", "limits": {"rpm": 60, "burst_s": 2}}])
    async with aiohttp.ClientSession() as session:
        replies = [await chat(session, gateway.url) for _ in range(3)]
        clock.advance(1.0)
        after_wait = await chat(session, gateway.url)
    assert [r.status for r in replies] == [200, 200, 429]  # 60 rpm, 2 s burst = 2
    refused = replies[2]
    assert refused.body["error"]["type"] == "rate_limit_error"
    assert refused.body["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1" and refused.headers["retry-after-ms"] == "1000"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"].startswith("req_")
    assert after_wait.status == 200
    assert metric(gateway, "understudy_rate_limited_total", scope="route:default") == 1
    records = gateway.wait_for_records(4)
    assert sorted(r["status"] for r in records) == [200, 200, 200, 429]


async def test_upstream_limits_apply_to_every_key(gateway_factory: Any, fake_cloud: FakeCloudServer) -> None:
    clock = ManualClock()
    gateway = gateway_factory(
        clock=clock,
        auth=keys(alice={}, bob={}),
        upstream={"base_url": fake_cloud.base_url, "limits": {"rpm": 60, "burst_s": 2}},
    )
    async with aiohttp.ClientSession() as session:
        statuses = [(await chat(session, gateway.url, f"sk-{n}")).status for n in ("alice", "bob", "alice")]
    assert statuses == [200, 200, 429]
    assert metric(gateway, "understudy_rate_limited_total", scope="upstream:default") == 1


def test_open_gateway_has_no_limit_machinery(gateway: Any) -> None:
    assert gateway.app.services.guard is None


# --- concurrency ----------------------------------------------------------------------------


def pool_limits(**limits: Any) -> dict[str, Any]:
    return {"max_concurrency": 1, "max_queue": 50, "queue_timeout_s": 10, **limits}


async def test_flooding_key_does_not_starve_a_light_one(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(
        auth=keys(heavy={}, light={}), upstream={"base_url": fake_cloud.base_url, "limits": pool_limits()}
    )
    pool = gateway.app.services.guard.pools["upstream:default"]
    finished: list[str] = []

    async def call(session: aiohttp.ClientSession, key: str) -> int:
        reply = await chat(session, gateway.url, key, model="slow-150")
        finished.append(key)
        return reply.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:
        heavy = [asyncio.create_task(call(session, "sk-heavy")) for _ in range(12)]
        for _ in range(500):  # until most of heavy's requests wait in the queue
            if pool.depth >= 8:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        light_status = await call(session, "sk-light")
        light_latency = time.monotonic() - started
        statuses = await asyncio.gather(*heavy)
    assert light_status == 200 and statuses == [200] * 12
    # Round-robin: light goes next after the request in flight, not after heavy's backlog
    # (FIFO would have made it wait for 11 heavy requests, ~1.6 s).
    assert finished.index("sk-light") <= 3, finished
    assert light_latency < 1.0, light_latency


async def test_full_queue_is_503_with_retry_after(gateway_factory: Any, fake_cloud: FakeCloudServer) -> None:
    limits = pool_limits(max_queue=1)
    gateway = gateway_factory(upstream={"base_url": fake_cloud.base_url, "limits": limits})
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(*(chat(session, gateway.url, model="slow-300") for _ in range(4)))
    statuses = sorted(r.status for r in replies)
    assert statuses == [200, 200, 503, 503]
    refused = next(r for r in replies if r.status == 503)
    assert refused.body["error"]["type"] == "overloaded_error"
    assert int(refused.headers["retry-after"]) >= 1
    assert metric(gateway, "understudy_rate_limited_total", scope="queue:upstream:default") == 2
    assert metric(gateway, "understudy_queue_depth", pool="upstream:default") == 0


async def test_queue_wait_timeout_is_503_not_a_hang(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    limits = pool_limits(queue_timeout_s=0.2)
    gateway = gateway_factory(upstream={"base_url": fake_cloud.base_url, "limits": limits})
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        slow, waiting = await asyncio.gather(
            chat(session, gateway.url, model="slow-800"), _after(0.1, chat(session, gateway.url))
        )
        elapsed = time.monotonic() - started
        again = await chat(session, gateway.url)
    assert slow.status == 200 and waiting.status == 503
    assert "no slot within 0.2 s" in waiting.body["error"]["message"]
    assert elapsed < 1.5 and again.status == 200


async def test_key_concurrency_cap(gateway_factory: Any) -> None:
    gateway = gateway_factory(auth=keys(alice={"max_concurrency": 1, "max_queue": 0}, bob={}))
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(
            *(chat(session, gateway.url, "sk-alice", model="slow-300") for _ in range(2)),
            _after(0.1, chat(session, gateway.url, "sk-bob")),
        )
    assert sorted(r.status for r in replies[:2]) == [200, 503] and replies[2].status == 200


async def test_local_backend_has_its_own_pool(data_dir: Path) -> None:
    settings = load_settings(
        None,
        environ={},
        data_dir=data_dir,
        local={"limits": {"max_concurrency": 1, "max_queue": 0}},
        upstream={"limits": {"max_concurrency": 5}},
    )
    guard = Guard(settings, Metrics())
    route, view = settings.all_routes()[0], RequestView(body=None)
    ex = Exchange(method="POST", endpoint="/v1/chat/completions")
    async with guard.admit(ex, None, route, view, "default", backend="local") as admission:
        assert [pool.name for pool in admission.pools] == ["local"]
        with pytest.raises(Overloaded):
            async with guard.admit(ex, None, route, view, "default", backend="local"):
                pass
    cloud = guard.admit(ex, None, route, view, "default")
    assert [pool.name for pool in cloud.pools] == ["upstream:default"]


async def test_stream_settles_tokens_on_its_usage(gateway_factory: Any) -> None:
    clock = ManualClock()
    gateway = gateway_factory(clock=clock, auth=keys(alice={"tpm": 60_000}))
    bucket_of = gateway.app.services.guard.limiter.bucket
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": 500,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": "Bearer sk-alice"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        text = await response.text()
    assert response.status == 200 and "[DONE]" in text
    assert response.headers["x-ratelimit-limit-tokens"] == "60000"
    (rate,) = gateway.app.services.guard.rates["key:alice"]
    assert bucket_of(rate).level == pytest.approx(3 + 4)  # the usage, not the 504 estimated


async def _after(delay: float, coroutine: Any) -> Any:
    await asyncio.sleep(delay)
    return await coroutine


# --- units ----------------------------------------------------------------------------------


async def test_memory_limiter_refuses_all_or_nothing_and_settles() -> None:
    clock = ManualClock()
    limiter = MemoryLimiter(clock)
    requests, tokens = Rate("key:a", "requests", 600, 1.0), Rate("key:a", "tokens", 600, 1.0)
    assert (await limiter.acquire([Charge(requests, 1), Charge(tokens, 8)])).allowed
    refused = await limiter.acquire([Charge(requests, 1), Charge(tokens, 5)])
    assert not refused.allowed and refused.refused_by == tokens
    assert refused.retry_after_s == pytest.approx(0.3)
    assert limiter.bucket(requests).level == pytest.approx(1)  # nothing taken by the refusal
    await limiter.adjust([Charge(tokens, -6)])  # the answer used 2, not 8
    assert (await limiter.acquire([Charge(requests, 1), Charge(tokens, 5)])).allowed
    # A charge over the whole capacity fits an empty bucket only, then is owed.
    clock.advance(10)
    assert (await limiter.acquire([Charge(tokens, 25)])).allowed
    assert not (await limiter.acquire([Charge(tokens, 1)])).allowed
    clock.advance(2.5)
    assert (await limiter.acquire([Charge(tokens, 10)])).allowed


def test_token_estimate_and_header_formats() -> None:
    body = {"messages": [{"role": "user", "content": "a" * 40}], "max_tokens": 10, "n": 2}
    assert estimate_tokens("/v1/chat/completions", body) == 10 + 20
    assert estimate_tokens("/v1/chat/completions", {"messages": []}) == 256
    assert estimate_tokens("/v1/embeddings", {"input": ["abcd", "efgh"]}) == 2
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "b" * 8}]}]}
    assert estimate_tokens("/v1/responses", {"input": parts["messages"], "max_output_tokens": 1}) == 3
    assert [format_reset(s) for s in (0.0204, 1.5, 360)] == ["20ms", "1.5s", "6m0s"]


def test_tightest_of_ours_and_the_upstreams_headers_wins() -> None:
    upstream = [(b"x-ratelimit-remaining-requests", b"3"), (b"x-ratelimit-limit-requests", b"500")]
    upstream += [(b"x-ratelimit-remaining-tokens", b"90000"), (b"x-ratelimit-limit-tokens", b"100000")]
    ours = [(b"x-ratelimit-limit-requests", b"60"), (b"x-ratelimit-remaining-requests", b"5")]
    ours += [(b"x-ratelimit-limit-tokens", b"1000"), (b"x-ratelimit-remaining-tokens", b"900")]
    merged = dict(merge_rate_limit_headers(upstream, ours))
    assert merged[b"x-ratelimit-limit-requests"] == b"500"  # the upstream's 3 left is tighter
    assert merged[b"x-ratelimit-limit-tokens"] == b"1000"
    assert len(merge_rate_limit_headers(upstream, ours)) == 4
