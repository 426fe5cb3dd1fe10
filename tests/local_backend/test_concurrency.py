"""Back-pressure and liveness: a full queue answers 503, /health answers during generation,
and a client that hangs up stops its generation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.local_backend.support import RemoteBackend

PROMPT: list[Any] = [{"role": "user", "content": "hello"}]
LONG: dict[str, Any] = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tight_backend(lively_model_dir: Path, backend_data_dir: Path) -> Iterator[RemoteBackend]:
    """A server that runs one sequence at a time and lets one more wait."""
    server = RemoteBackend(
        lively_model_dir, backend_data_dir, "--max-queue", "1", "--max-batch-size", "1", "--threads", "1"
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


async def test_full_queue_answers_503_with_retry_after(tight_backend: RemoteBackend) -> None:
    body = {"model": "lively-llama", "messages": PROMPT, **LONG}
    async with httpx.AsyncClient(base_url=tight_backend.base_url, timeout=60) as http:
        responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(6)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused and any(r.status_code == 200 for r in responses)
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert refused[0].json()["error"]["code"] == "queue_full"
    assert tight_backend.metric("understudy_backend_rejected_requests_total") >= len(refused)


def test_openai_client_sees_the_503_as_an_error(tight_backend: RemoteBackend) -> None:
    client = tight_backend.client()
    with pytest.raises(openai.InternalServerError) as caught:
        asyncio.run(_flood(tight_backend))
    assert caught.value.status_code == 503
    assert client.models.list().data[0].id.endswith("lively-llama")


async def _flood(backend: RemoteBackend) -> None:
    client = backend.async_client()
    await asyncio.gather(
        *(
            client.chat.completions.create(
                model="lively-llama", messages=PROMPT, max_tokens=480, extra_body={"ignore_eos": True}
            )
            for _ in range(5)
        )
    )


def test_health_answers_while_a_long_generation_runs(backend: RemoteBackend) -> None:
    body = {"model": "tiny", "messages": PROMPT, "stream": True, **LONG}
    with httpx.stream("POST", backend.base_url + "/v1/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)
        started = time.monotonic()
        health = httpx.get(backend.base_url + "/health", timeout=5)
        latency = time.monotonic() - started
        rest = [line for line in lines if line.startswith("data: ")]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert latency < 0.5
    assert rest[-1] == "data: [DONE]" and len(rest) > 100, "the generation was not running during the check"


def test_a_client_that_disconnects_stops_its_generation(backend: RemoteBackend) -> None:
    cancelled = backend.metric("understudy_backend_cancelled_requests_total")
    generated = backend.metric("understudy_backend_tokens_generated_total", 'model="tiny"')
    body = {"model": "tiny", "messages": PROMPT, "stream": True, **LONG}
    with httpx.stream("POST", backend.base_url + "/v1/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        for _ in range(3):
            next(lines)
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 10
    while backend.metric("understudy_backend_cancelled_requests_total") == cancelled:
        assert time.monotonic() < deadline, "the generation was never cancelled"
        time.sleep(0.05)
    time.sleep(0.2)
    spent = backend.metric("understudy_backend_tokens_generated_total", 'model="tiny"') - generated
    assert spent < LONG["max_tokens"] / 2


def test_non_streaming_client_that_times_out_stops_its_generation(backend: RemoteBackend) -> None:
    cancelled = backend.metric("understudy_backend_cancelled_requests_total")
    body = {"model": "tiny", "messages": PROMPT, **LONG, "n": 8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(backend.base_url + "/v1/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while backend.metric("understudy_backend_cancelled_requests_total") == cancelled:
        assert time.monotonic() < deadline, "the generation was never cancelled"
        time.sleep(0.05)


def test_metrics_expose_the_backend_series(backend: RemoteBackend) -> None:
    text = backend.get("/metrics").text
    for name in (
        "understudy_backend_tokens_generated_total",
        "understudy_backend_queue_depth",
        "understudy_backend_batch_size_bucket",
        "understudy_backend_tokens_per_second",
        "understudy_backend_requests_total",
        "understudy_backend_adapters_loaded",
    ):
        assert name in text
    assert backend.metric("understudy_backend_queue_depth") == 0
    assert (
        backend.metric("understudy_backend_requests_total", 'code="200",endpoint="/v1/chat/completions"') > 0
    )
