"""Upstream faults, streamed and not, against the real fake cloud and a real gateway.

Each fault is sent as a concurrent batch. Every request must get the right client-facing
answer (an OpenAI error body, or a stream that ends with an SSE error event and closes), a
log record saying what happened, and leave nothing behind: once the batch is over, the open
sockets between client, gateway and upstream and the tasks in the gateway's event loop are
back to what they were before it (the pooled keep-alive connections excepted).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import orjson
import psutil
import pytest
from multidict import CIMultiDict

from gateway.demo.fakecloud import FakeCloudServer
from tests.conftest import GatewayFactory, RunningGateway

READ_TIMEOUT_S = 0.5  # silence allowed between two upstream bytes
TOTAL_TIMEOUT_S = 1.5  # the bound on a whole upstream answer, an endless stream's included
ATTEMPTS = 3
PER_MODE = 3  # requests per fault and per mode (streamed, not streamed)
WARM = 4  # concurrent warm-up requests: the keep-alive pool they leave is the baseline


@dataclass(frozen=True)
class Fault:
    model: str
    stream: bool
    status: int  # what the client gets
    code: str | None  # the OpenAI error code it gets (in the body or the SSE error event)
    outcome: str  # the log record's
    record_status: int
    error: str | None  # a phrase of the record's error
    attempts: int  # upstream calls per request

    @property
    def ends_with_error_event(self) -> bool:
        return self.stream and self.status == 200 and self.code is not None


def upstream_error(model: str, status: int, stream: bool, attempts: int = ATTEMPTS) -> Fault:
    # The upstream's own error, passed on with its status and body once retries are spent.
    return Fault(
        model, stream, status, f"fake_{status}", "error", status, f"upstream answered {status}", attempts
    )


def failed(model: str, stream: bool, status: int, code: str, error: str, attempts: int = 1) -> Fault:
    return Fault(model, stream, status, code, "error", status, error, attempts)


def cut_stream(model: str, code: str, error: str) -> Fault:
    # The stream began (200 and its first events went out): it ends with an error event.
    return Fault(model, True, 200, code, "error", 200, error, 1)


def ok(model: str, stream: bool) -> Fault:
    return Fault(model, stream, 200, None, "ok", 200, None, 1)


TIMED_OUT = "did not answer in time"
CUT = "answer was cut off"
CLOSED = "closed the connection"
NOT_JSON = "not valid JSON"

FAULTS = [
    *(upstream_error(f"error-{s}", s, stream) for s in (500, 502) for stream in (False, True)),
    *(upstream_error("error-503-0.01", 503, stream) for stream in (False, True)),
    # 429 with a Retry-After under the cap: waited for and retried; over it: passed on at once
    *(upstream_error("error-429-0.05", 429, stream) for stream in (False, True)),
    *(upstream_error("error-429-30", 429, stream, attempts=1) for stream in (False, True)),
    # slow first byte (before the headers), within and beyond the read timeout
    ok("slow-200", False),
    ok("slow-200", True),
    failed("slow-1000", False, 504, "upstream_timeout", TIMED_OUT),
    failed("slow-1000", True, 504, "upstream_timeout", TIMED_OUT),
    # headers at once, then a slow first byte of the body (or of the stream)
    ok("stall-200", False),
    ok("stall-200", True),
    failed("stall-1000", False, 504, "upstream_timeout", TIMED_OUT),
    cut_stream("stall-1000", "upstream_timeout", TIMED_OUT),
    # cut mid-way: a whole answer is retried (nothing reached the client yet), a stream is not
    failed("cut", False, 502, "upstream_unreachable", CUT, attempts=ATTEMPTS),
    cut_stream("cut", "upstream_unreachable", CUT),
    *(failed("drop", s, 502, "upstream_unreachable", CLOSED, attempts=ATTEMPTS) for s in (False, True)),
    *(failed("garbage", s, 502, "upstream_invalid_response", NOT_JSON) for s in (False, True)),
    cut_stream("garbage-stream", "upstream_invalid_response", NOT_JSON),
    *(failed("html", s, 502, "upstream_invalid_response", NOT_JSON) for s in (False, True)),
    # never ends: bounded by the upstream's total timeout
    failed("endless", False, 504, "upstream_timeout", TIMED_OUT),
    cut_stream("endless", "upstream_timeout", TIMED_OUT),
]


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    seconds: float

    def error_code(self, stream: bool) -> str | None:
        if not stream or self.status != 200:
            error = orjson.loads(self.body).get("error")
            if error is None:
                return None
            assert set(error) >= {"message", "type", "code"}, error
            return str(error["code"])
        events = [e for e in self.body.split(b"\n\n") if e.strip()]
        last = events[-1].removeprefix(b"data: ")
        if last == b"[DONE]":
            return None
        error = orjson.loads(last)["error"]
        assert set(error) >= {"message", "type", "code"}, error
        return str(error["code"])


async def send(session: aiohttp.ClientSession, url: str, model: str, stream: bool, text: str) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    started = time.monotonic()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        payload = await response.read()  # to the end: the connection closes cleanly
    return Reply(response.status, response.headers.copy(), payload, time.monotonic() - started)


# --- what is left behind ----------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    to_upstream: int  # the gateway's pooled connections to the fake cloud
    upstream_side: int  # the fake cloud's ends of them
    client_side: int  # the gateway's ends of client connections
    states: Counter[str]
    tasks: int

    def problems(self, baseline: Snapshot) -> list[str]:
        found = []
        if set(self.states) - {psutil.CONN_ESTABLISHED}:
            found.append(f"sockets not cleanly open or closed: {dict(self.states)}")
        if self.to_upstream > baseline.to_upstream or self.upstream_side != self.to_upstream:
            found.append(
                f"upstream connections {self.to_upstream}/{self.upstream_side}, pool {baseline.to_upstream}"
            )
        if self.client_side:
            found.append(f"{self.client_side} client connections still open in the gateway")
        if self.tasks != baseline.tasks:
            found.append(f"{self.tasks} tasks in the gateway's loop, {baseline.tasks} before")
        return found


def snapshot(gateway: RunningGateway, upstream_port: int) -> Snapshot:
    mine = [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status != psutil.CONN_LISTEN
        and (
            c.laddr.port in (upstream_port, gateway.port)
            or (c.raddr and c.raddr.port in (upstream_port, gateway.port))
        )
    ]
    return Snapshot(
        to_upstream=sum(1 for c in mine if c.raddr and c.raddr.port == upstream_port),
        upstream_side=sum(1 for c in mine if c.laddr.port == upstream_port),
        client_side=sum(1 for c in mine if c.laddr.port == gateway.port),
        states=Counter(c.status for c in mine),
        tasks=loop_tasks(gateway),
    )


def loop_tasks(gateway: RunningGateway) -> int:
    loop = gateway.app.services.loop
    assert loop is not None

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return asyncio.run_coroutine_threadsafe(count(), loop).result(5)


async def settled(gateway: RunningGateway, upstream_port: int, baseline: Snapshot | None = None) -> Snapshot:
    """The first snapshot that stays the same for a while (and, given a baseline, matches it):
    closed connections take a moment to be noticed at both ends."""
    deadline = time.monotonic() + 10
    last = None
    while True:
        await asyncio.sleep(0.2)
        now = await asyncio.to_thread(snapshot, gateway, upstream_port)
        steady = now == last and (baseline is None or not now.problems(baseline))
        if steady or time.monotonic() > deadline:
            return now
        last = now


# --- the matrix -------------------------------------------------------------------------------


@pytest.fixture
def gateway(gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer) -> RunningGateway:
    return gateway_factory(
        upstream={
            "base_url": fake_cloud.base_url,
            "read_timeout_s": READ_TIMEOUT_S,
            "timeout_s": TOTAL_TIMEOUT_S,
            "retry": {
                "attempts": ATTEMPTS,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.05,
                "retry_after_cap_s": 1,
            },
            # every fault here would open it; the breaker has its own tests (gateway/test_resilience.py)
            "breaker": {"failure_threshold": 10_000},
        }
    )


async def warm_up(gateway: RunningGateway, fake_cloud: FakeCloudServer) -> Snapshot:
    """Fill the keep-alive pool with WARM connections and return the settled state."""
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(
            *(send(session, gateway.url, "slow-100", i % 2 == 0, f"warm {i}") for i in range(WARM))
        )
    assert [r.status for r in replies] == [200] * WARM
    baseline = await settled(gateway, fake_cloud.port)
    assert baseline.to_upstream == WARM and not baseline.problems(baseline), baseline
    return baseline


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.model}-{'stream' if f.stream else 'whole'}")
async def test_upstream_fault(gateway: RunningGateway, fake_cloud: FakeCloudServer, fault: Fault) -> None:
    baseline = await warm_up(gateway, fake_cloud)
    seen_before = len(fake_cloud.cloud.requests)
    texts = [f"{fault.model} request {i}" for i in range(PER_MODE)]
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(
            *(send(session, gateway.url, fault.model, fault.stream, t) for t in texts)
        )

    for reply in replies:
        assert reply.status == fault.status, reply.body[:300]
        assert reply.error_code(fault.stream) == fault.code, reply.body[-300:]
        if fault.ends_with_error_event:
            assert reply.headers["Content-Type"].startswith("text/event-stream")
            assert b"[DONE]" not in reply.body
        if fault.status == 429:  # the upstream's Retry-After reaches the client
            assert reply.headers["retry-after"] == fault.model.rsplit("-", 1)[1]
        if fault.model.startswith("endless"):  # bounded by the total timeout, not the test's
            assert TOTAL_TIMEOUT_S - 0.1 <= reply.seconds < TOTAL_TIMEOUT_S + 2
    assert len(fake_cloud.cloud.requests) - seen_before == PER_MODE * fault.attempts

    records = {r["request_id"]: r for r in await asyncio.to_thread(gateway.wait_for_records, WARM + PER_MODE)}
    for reply in replies:
        record = records[reply.headers["x-request-id"]]
        assert (record["status"], record["outcome"], record["stream"]) == (
            fault.record_status,
            fault.outcome,
            fault.stream,
        )
        assert record["backend"] == "cloud" and record["model"] == fault.model
        if fault.error is None:
            assert record["error"] is None
        else:
            assert fault.error in record["error"]

    after = await settled(gateway, fake_cloud.port, baseline)
    assert not after.problems(baseline), after


async def test_endless_stream_record_is_capped(gateway: RunningGateway) -> None:
    """A stream that never ends is cut at the total timeout, and its record at the size
    every logged body is cut at."""
    async with aiohttp.ClientSession() as session:
        reply = await send(session, gateway.url, "endless-20000", True, "flood")
    assert reply.status == 200 and reply.error_code(True) == "upstream_timeout"
    assert len(reply.body) > 2 << 20  # more than the cap reached the client
    (record,) = await asyncio.to_thread(gateway.wait_for_records, 1)
    assert record["outcome"] == "error" and record["response"]["truncated"] is True
    assert len(record["response"]["text"]) == 1 << 20


async def test_an_answer_over_the_size_limit_is_a_502_not_a_memory_spike(
    gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer
) -> None:
    """A non-streamed answer is read whole before it is logged: beyond max_response_bytes it
    is refused (declared length or not), and the connection is not reused."""
    gateway = gateway_factory(upstream={"base_url": fake_cloud.base_url, "max_response_bytes": 100_000})
    baseline = await settled(gateway, fake_cloud.port)
    async with aiohttp.ClientSession() as session:
        fits = await send(session, gateway.url, "huge-50000", False, "fits")
        too_big = await send(session, gateway.url, "huge-200000", False, "too big")
    assert fits.status == 200 and len(orjson.loads(fits.body)["choices"][0]["message"]["content"]) == 50_000
    assert too_big.status == 502 and too_big.error_code(False) == "upstream_invalid_response"
    assert "100000-byte limit" in orjson.loads(too_big.body)["error"]["message"]
    records = await asyncio.to_thread(gateway.wait_for_records, 2)
    assert sorted(r["status"] for r in records) == [200, 502]
    after = await settled(gateway, fake_cloud.port, baseline)
    assert not after.problems(baseline), after

    # no declared length: counted as it arrives (a trickle of ~100 bytes/s passes 64 in ~1 s)
    small = gateway_factory(upstream={"base_url": fake_cloud.base_url, "max_response_bytes": 64})
    async with aiohttp.ClientSession() as session:
        endless = await send(session, small.url, "endless", False, "never ends")
    assert endless.status == 502 and endless.error_code(False) == "upstream_invalid_response"
    assert endless.seconds < 10  # the limit, long before the 600 s total timeout
