"""Upstream retries and the circuit breaker, against the real fake cloud."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.demo.fakecloud import FakeCloudServer
from gateway.errors import CircuitOpen
from gateway.limits.clock import ManualClock
from gateway.limits.settings import BreakerSettings
from gateway.upstream.resilience import CircuitBreaker, retry_after_s
from tests.gateway.limits.ratelimit_client import chat
from tests.gateway.proxy.test_proxy import socket_closed_port


def metric(gateway: Any, name: str, **labels: str) -> float:
    value = gateway.app.services.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def upstream(fake_cloud: FakeCloudServer, **settings: Any) -> dict[str, Any]:
    return {"upstream": {"base_url": fake_cloud.base_url, **settings}}


def seen(fake_cloud: FakeCloudServer, model: str) -> int:
    return sum(1 for r in fake_cloud.cloud.requests if r.body and r.json().get("model") == model)


async def test_retries_then_success_after_two_failures(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(**upstream(fake_cloud, retry={"backoff_initial_s": 0.01}))
    fake_cloud.cloud.failures["flaky"] = 2  # two 503s with Retry-After: 1, then answers
    async with aiohttp.ClientSession() as session:
        reply = await chat(session, gateway.url, model="flaky", content="third time")
    assert reply.status == 200
    assert reply.body["choices"][0]["message"]["content"] == "echo: third time"
    assert seen(fake_cloud, "flaky") == 3
    assert metric(gateway, "understudy_upstream_retries_total") == 2
    (record,) = gateway.wait_for_records(1)
    assert record["status"] == 200


async def test_gives_up_after_the_configured_attempts_with_the_last_answer(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(**upstream(fake_cloud, retry={"attempts": 2, "backoff_initial_s": 0.01}))
    async with aiohttp.ClientSession() as session:
        reply = await chat(session, gateway.url, model="error-500")
        bad_request = await chat(session, gateway.url, model="error-400")
    assert reply.status == 500 and reply.body["error"]["code"] == "fake_500"
    assert seen(fake_cloud, "error-500") == 2
    assert seen(fake_cloud, "error-400") == 1 and bad_request.status == 400  # a 4xx is not retried


async def test_connection_errors_are_retried(gateway_factory: Any) -> None:
    with socket_closed_port() as port:
        gateway = gateway_factory(
            upstream={"base_url": f"http://127.0.0.1:{port}/v1", "retry": {"backoff_initial_s": 0.01}}
        )
        async with aiohttp.ClientSession() as session:
            reply = await chat(session, gateway.url)
    assert reply.status == 502 and reply.body["error"]["code"] == "upstream_unreachable"
    assert metric(gateway, "understudy_upstream_retries_total") == 2


async def test_upstream_retry_after_over_the_cap_is_not_waited_for(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(**upstream(fake_cloud, retry={"retry_after_cap_s": 0.5}))
    async with aiohttp.ClientSession() as session:
        reply = await chat(session, gateway.url, model="error-429")
    assert reply.status == 429 and reply.headers["retry-after"] == "1"
    assert seen(fake_cloud, "error-429") == 1


async def test_no_retry_once_the_stream_began(gateway_factory: Any, fake_cloud: FakeCloudServer) -> None:
    gateway = gateway_factory(**upstream(fake_cloud, retry={"backoff_initial_s": 0.01}))
    body = {"model": "cut", "messages": [{"role": "user", "content": "a b c d e f g h"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        text = (await response.read()).decode()
    assert response.status == 200
    assert '"content":"echo:"' in text  # the first chunks reached the client ...
    assert '"type":"upstream_error"' in text  # ... then the error event, and no second call
    assert seen(fake_cloud, "cut") == 1
    assert metric(gateway, "understudy_upstream_retries_total") == 0


async def test_circuit_opens_fails_fast_and_recovers(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    clock = ManualClock()
    settings = upstream(fake_cloud, retry={"attempts": 1}, breaker={"failure_threshold": 3, "cooldown_s": 30})
    gateway = gateway_factory(clock=clock, **settings)
    breaker = gateway.app.services.upstreams["default"].breaker
    async with aiohttp.ClientSession() as session:
        failures = [await chat(session, gateway.url, model="error-502") for _ in range(3)]
        assert [r.status for r in failures] == [502] * 3 and breaker.is_open
        fast = await chat(session, gateway.url)
        assert fast.status == 503 and fast.body["error"]["code"] == "circuit_open"
        assert fast.headers["retry-after"] == "30"
        assert seen(fake_cloud, "gpt-4o-mini") == 0  # failed fast: the upstream never saw it
        assert metric(gateway, "understudy_circuit_open", upstream="default") == 1
        clock.advance(30)
        assert not breaker.is_open  # a probe may go
        probe = await chat(session, gateway.url, model="error-503")
        assert probe.status == 503 and breaker.is_open  # failed probe: open again
        assert (await chat(session, gateway.url)).body["error"]["code"] == "circuit_open"
        clock.advance(30)
        assert (await chat(session, gateway.url)).status == 200  # the probe succeeded
        assert breaker.state == "closed"
        assert (await chat(session, gateway.url)).status == 200
    assert metric(gateway, "understudy_circuit_open", upstream="default") == 0


def test_half_open_lets_a_single_probe_through() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("u", BreakerSettings(failure_threshold=1, cooldown_s=5), clock)
    breaker.record_failure()
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(5)
    assert breaker.before_call() is True  # the probe
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # others wait for its verdict
    breaker.abandon_probe()  # the probe's client left: the next call probes instead
    assert breaker.before_call() is True
    breaker.record_success()
    assert breaker.before_call() is False and breaker.state == "closed"


def test_retry_after_header_forms() -> None:
    assert retry_after_s([(b"retry-after", b"2")]) == 2.0
    assert retry_after_s([(b"retry-after", b"1"), (b"retry-after-ms", b"250")]) == 0.25
    assert retry_after_s([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")]) == 0.0
    assert retry_after_s([(b"retry-after", b"soon")]) is None
    assert retry_after_s([]) is None
