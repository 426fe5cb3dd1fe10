"""Enough of /admin/logs and /metrics to see the pairs and the request counts."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        return response.status, await response.json(content_type=None)


def _chat(gateway: Any, count: int, model: str = "gpt-4o-mini") -> None:
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0)
    for i in range(count):
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"m{i}"}])


async def test_admin_logs_pages_with_cursor(gateway_factory: Any) -> None:
    gateway = gateway_factory(routes=[{"name": "alpha", "match": ["alpha-*"]}])
    _chat(gateway, 5)
    _chat(gateway, 2, model="alpha-1")
    seen: list[int] = []
    cursor = None
    while True:
        url = gateway.url + "/admin/logs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await _get(url)
        assert status == 200
        seen += [row["id"] for row in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 and seen == sorted(seen, reverse=True)
    status, page = await _get(gateway.url + "/admin/logs?route=alpha")
    assert [row["route"] for row in page["data"]] == ["alpha", "alpha"]
    row = page["data"][0]
    assert {
        "id",
        "ts",
        "route",
        "backend",
        "model",
        "status",
        "latency_ms",
        "request",
        "response",
        "usage",
    } <= set(row)
    assert row["response"]["choices"][0]["message"]["content"] == "echo: m1"
    assert row["ts"].endswith("Z")


async def test_admin_logs_bad_query_is_400(gateway: Any) -> None:
    for query in ("limit=abc", "limit=0", "cursor=x1", "since=yesterday"):
        status, body = await _get(gateway.url + "/admin/logs?" + query)
        assert status == 400, query
        assert body["error"]["type"] == "invalid_request_error"


async def test_admin_requires_key_when_configured(gateway_factory: Any) -> None:
    gateway = gateway_factory(admin_key="admin-secret-1")
    status, body = await _get(gateway.url + "/admin/logs")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _ = await _get(gateway.url + "/admin/logs", {"authorization": "Bearer wrong"})
    assert status == 401
    status, _ = await _get(gateway.url + "/admin/logs", {"authorization": "Bearer admin-secret-1"})
    assert status == 200


async def test_metrics_count_requests(gateway: Any) -> None:
    _chat(gateway, 3)
    with pytest.raises(openai.InternalServerError):
        _chat(gateway, 1, model="error-503")
    await _get(gateway.url + "/healthz")
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/metrics") as response:
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = ("understudy_requests_total", (("backend", "cloud"), ("code", "200"), ("route", "default")))
    failed = ("understudy_requests_total", (("backend", "cloud"), ("code", "503"), ("route", "default")))
    assert samples[ok] == 3
    assert samples[failed] == 1
    prompt = ("understudy_tokens_total", (("backend", "cloud"), ("kind", "completion"), ("route", "default")))
    assert samples[prompt] == 6
    assert samples[("understudy_log_records_total", ())] >= 4
    assert samples[("understudy_log_write_errors_total", ())] == 0


async def test_health_and_ready(gateway: Any) -> None:
    assert await _get(gateway.url + "/healthz") == (200, {"status": "ok"})
    status, body = await _get(gateway.url + "/readyz")
    assert status == 200 and body["status"] == "ready"
