"""The admin API's behaviour: auth, body validation (400/404/409/413/422), the adaptive
endpoints on a real adaptive route, and the log filters, paging, export and deletion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from gateway.demo.fakecloud import FakeCloudServer
from gateway.errors import Forbidden, Unauthorized
from gateway.origin import ALLOWED_HOSTS, AllowedHosts
from gateway.web.auth import SESSION_COOKIE, Sessions, require_admin
from tests.gateway.web.admin_fixtures import ADMIN_KEY, ROUTE, AdaptiveGateway, running_adaptive_gateway

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


async def call(
    base: str,
    method: str,
    path: str,
    *,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, data=data, headers={**AUTH, **(headers or {})}) as response,
    ):
        text = await response.read()
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            payload = text
        return response.status, payload, response.headers


# --- auth -----------------------------------------------------------------------------------


async def test_auth_refuses_missing_and_wrong_keys(adaptive_gateway: AdaptiveGateway) -> None:
    for path in ("/admin/routes", "/admin/logs", "/admin/dashboard", "/admin/openapi.json"):
        status, body, _ = await call(adaptive_gateway.url, "GET", path, headers={"authorization": ""})
        assert status == 401 and body["error"]["type"] == "authentication_error", path
        for wrong in ("Bearer wrong", f"Basic {ADMIN_KEY}", f"Bearer {ADMIN_KEY}x", "Bearer"):
            status, _, _ = await call(adaptive_gateway.url, "GET", path, headers={"authorization": wrong})
            assert status == 401, (path, wrong)
        status, _, _ = await call(adaptive_gateway.url, "GET", path)
        assert status == 200, path
    # refused before anything changes
    status, _, _ = await call(
        adaptive_gateway.url,
        "POST",
        f"/admin/routes/{ROUTE}/mode",
        body={"mode": "cloud"},
        headers={"authorization": "x"},
    )
    assert status == 401
    assert adaptive_gateway.gateway.app.services.controller.describe(ROUTE)["pinned"] is None  # type: ignore[union-attr]


def _request(
    host: str, method: str = "GET", headers: dict[str, str] | None = None, sessions: Sessions | None = None
) -> Request:
    raw = [(k.encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **(headers or {})}.items()]
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "headers": raw,
        "client": (host, 5000),
        "path": "/admin/x",
        ALLOWED_HOSTS: AllowedHosts(["gateway.internal"]),  # as the app puts it there
    }
    if sessions is not None:
        app = Starlette()
        app.state.sessions = sessions
        scope["app"] = app
    return Request(scope)


def test_without_a_key_only_loopback_and_never_cross_site() -> None:
    require_admin(_request("127.0.0.1"), None)
    require_admin(_request("::1"), None)
    require_admin(_request("127.0.0.1", headers={"host": "gateway.internal:8000"}), None)
    with pytest.raises(Forbidden):
        require_admin(_request("10.1.2.3"), None)
    # a page on another site must not drive a loopback gateway through the user's browser
    with pytest.raises(Forbidden):
        require_admin(_request("127.0.0.1", "POST", {"origin": "https://evil.example"}), None)
    with pytest.raises(Forbidden):
        require_admin(_request("127.0.0.1", "POST", {"sec-fetch-site": "cross-site"}), ADMIN_KEY)
    require_admin(_request("127.0.0.1", "POST", {"origin": "http://127.0.0.1:8000"}), None)
    # ... nor one on a domain rebound to 127.0.0.1 (issue 19), nor a request without Host
    with pytest.raises(Forbidden):
        require_admin(_request("127.0.0.1", headers={"host": "rebind.evil.example:8000"}), None)
    no_host = _request("127.0.0.1")
    no_host.scope["headers"] = []
    with pytest.raises(Forbidden):
        require_admin(no_host, None)


def test_session_cookie_authenticates_only_while_valid() -> None:
    sessions = Sessions(3600)
    token = sessions.issue(ADMIN_KEY)
    require_admin(
        _request("10.0.0.9", headers={"cookie": f"{SESSION_COOKIE}={token}"}, sessions=sessions), ADMIN_KEY
    )
    for cookie in ("1.abc", token + "x", Sessions(3600).issue("another-key")):
        with pytest.raises(Unauthorized):
            require_admin(
                _request("10.0.0.9", headers={"cookie": f"{SESSION_COOKIE}={cookie}"}, sessions=sessions),
                ADMIN_KEY,
            )
    sessions.revoke(token, ADMIN_KEY)
    with pytest.raises(Unauthorized):
        require_admin(
            _request("10.0.0.9", headers={"cookie": f"{SESSION_COOKIE}={token}"}, sessions=sessions),
            ADMIN_KEY,
        )


# --- routes and the adaptive cycle ------------------------------------------------------------


async def test_route_listing_and_detail(adaptive_gateway: AdaptiveGateway) -> None:
    assert adaptive_gateway.chat("hello")[0] == "local"
    adaptive_gateway.chat("hello", model="gpt-4o-mini")
    status, body, _ = await call(adaptive_gateway.url, "GET", "/admin/routes")
    assert status == 200 and body["next_cursor"] is None
    by_name = {route["name"]: route for route in body["data"]}
    assert set(by_name) == {ROUTE, "default"}
    assert by_name[ROUTE]["mode"] == "local" and by_name[ROUTE]["active_adapter"] == 1
    assert by_name["default"] == {**by_name["default"], "adapt": False, "mode": "cloud", "serving": "cloud"}
    status, detail, _ = await call(adaptive_gateway.url, "GET", f"/admin/routes/{ROUTE}")
    assert status == 200 and detail["traffic"] == {"cloud": 0, "local": 1, "failover": 0}
    assert [h["to"] for h in detail["history"]] == ["training", "eval", "local"]
    status, body, _ = await call(adaptive_gateway.url, "GET", "/admin/routes/nope")
    assert status == 404 and body["error"]["code"] == "route_not_found"


@pytest.mark.parametrize(
    ("raw", "status", "code", "param"),
    [
        (b"", 400, "missing_body", None),
        (b"{mode: cloud", 400, "invalid_json", None),
        (b'{"mode": "sideways"}', 422, "invalid_value", "mode"),
        (b'{"mode": "cloud", "extra": 1}', 422, "invalid_value", "extra"),
        (b'{"mode": 1}', 422, "invalid_value", "mode"),
        (b"[]", 422, "invalid_value", None),
        (b"{}", 422, "invalid_value", "mode"),
    ],
)
async def test_mode_body_validation(
    adaptive_gateway: AdaptiveGateway, raw: bytes, status: int, code: str, param: str | None
) -> None:
    got, body, _ = await call(adaptive_gateway.url, "POST", f"/admin/routes/{ROUTE}/mode", raw=raw)
    assert got == status, body
    assert body["error"]["code"] == code and body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


async def test_pin_modes_and_conflicts(adaptive_gateway: AdaptiveGateway) -> None:
    url = adaptive_gateway.url
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/mode", body={"mode": "cloud"})
    assert status == 200 and body["pinned"] == "cloud" and body["serving"] == "cloud"
    assert adaptive_gateway.chat("pinned?")[0] == "cloud"
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/mode", body={"mode": "auto"})
    assert status == 200 and body["pinned"] is None and body["serving"] == "local"
    assert adaptive_gateway.chat("unpinned?")[0] == "local"
    # a route without the adaptive cycle, an unknown route, a too large body
    status, body, _ = await call(url, "POST", "/admin/routes/default/mode", body={"mode": "local"})
    assert status == 409 and body["error"]["code"] == "route_not_adaptive"
    status, _, _ = await call(url, "POST", "/admin/routes/nope/mode", body={"mode": "local"})
    assert status == 404
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/mode", raw=b" " * 70_000)
    assert status == 413


async def test_training_jobs_and_their_status(adaptive_gateway: AdaptiveGateway) -> None:
    url = adaptive_gateway.url
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/train")
    assert status == 202, body
    job_id = body["job_id"]
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/train")
    assert status == 409 and body["error"]["type"] == "conflict_error"
    deadline = time.monotonic() + 20
    while True:
        status, job, _ = await call(url, "GET", f"/admin/jobs/{job_id}")
        assert status == 200
        if job["status"] == "error":
            break
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)
    assert {
        "status",
        "message",
        "current_step",
        "total_steps",
        "current_epoch",
        "total_epochs",
        "loss",
    } <= set(job)
    assert "adapter_path" in job and job["route"] == ROUTE
    for bad in ("nope", "..%2F..%2Fetc", "x" * 300, "%2e%2e"):
        status, body, _ = await call(url, "GET", f"/admin/jobs/{bad}")
        assert status == 404 and body["error"]["type"] == "not_found_error", bad
    status, _, _ = await call(url, "POST", "/admin/routes/default/train")
    assert status == 409


async def test_adapters_roll_back_and_forward(adaptive_gateway: AdaptiveGateway) -> None:
    url = adaptive_gateway.url
    status, body, _ = await call(url, "GET", f"/admin/routes/{ROUTE}/adapters")
    assert status == 200
    assert [(a["version"], a["active"]) for a in body["data"]] == [(2, False), (1, True)]
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/adapter", body={"version": 2})
    assert status == 200 and body["active_adapter"] == 2
    assert adaptive_gateway.local.cloud.requests[-1].path == "/v1/load_lora_adapter"
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/adapter", body={"version": 9})
    assert status == 404 and body["error"]["code"] == "adapter_not_found"
    for bad in ({"version": 0}, {"version": "2"}, {"version": 1.5}, {"version": True}, {}):
        status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/adapter", body=bad)
        assert status == 422 and body["error"]["param"] == "version", bad
    status, body, _ = await call(url, "POST", f"/admin/routes/{ROUTE}/eval")
    assert status == 202 and body == {"adapter_version": 2, "status": "started"}


async def test_unknown_paths_and_methods_answer_in_openai_shape(adaptive_gateway: AdaptiveGateway) -> None:
    status, body, headers = await call(adaptive_gateway.url, "PUT", "/admin/logs")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert set(headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "DELETE"}
    status, body, _ = await call(adaptive_gateway.url, "GET", "/admin/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error"


# --- logs -----------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def test_log_filters_paging_export_and_delete(adaptive_gateway: AdaptiveGateway) -> None:
    url = adaptive_gateway.url
    for i in range(3):
        adaptive_gateway.chat(f"local {i}")
    middle = time.time()
    await asyncio.sleep(0.05)
    for i in range(2):
        adaptive_gateway.chat(f"cloud {i}", model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError):
        adaptive_gateway.chat("bad", model="error-400")
    adaptive_gateway.gateway.wait_for_records(6)

    async def ids(query: str) -> list[int]:
        status, body, _ = await call(url, "GET", "/admin/logs?" + query)
        assert status == 200, body
        return [row["id"] for row in body["data"]]

    assert len(await ids("route=task&backend=local")) == 3
    assert len(await ids("route=default&status=200")) == 2
    assert len(await ids("status=400")) == 1
    assert len(await ids(f"since={_iso(middle)}")) == 3
    assert len(await ids(f"until={_iso(middle)}")) == 3
    assert len(await ids("kind=judge")) == 0
    pages, cursor = [], ""
    while True:
        status, body, _ = await call(url, "GET", f"/admin/logs?limit=4{cursor}")
        pages.append([row["id"] for row in body["data"]])
        if body["next_cursor"] is None:
            break
        cursor = f"&cursor={body['next_cursor']}"
    assert [len(page) for page in pages] == [4, 2]
    flat = [i for page in pages for i in page]
    assert flat == sorted(flat, reverse=True) and len(set(flat)) == 6
    for bad in (
        "backend=moon",
        "status=99",
        "status=abc",
        "kind=robot",
        "until=tomorrow",
        "cursor=-1",
        "limit=1001",
    ):
        status, body, _ = await call(url, "GET", "/admin/logs?" + bad)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", bad

    status, text, headers = await call(url, "GET", "/admin/logs/export?route=default&status=200")
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    rows = [orjson.loads(line) for line in text.splitlines()]
    assert [row["route"] for row in rows] == ["default", "default"]
    assert (
        rows[0]["id"] < rows[1]["id"]
        and rows[0]["response"]["choices"][0]["message"]["content"] == "echo: cloud 0"
    )
    status, text, _ = await call(url, "GET", f"/admin/logs/export?since={_iso(middle)}&backend=cloud")
    assert len(text.splitlines()) == 3
    status, text, _ = await call(url, "GET", "/admin/logs/export?route=nothing")
    assert status == 200 and text == b""

    status, body, _ = await call(url, "DELETE", "/admin/logs")
    assert status == 400
    status, body, _ = await call(url, "DELETE", f"/admin/logs?before={_iso(middle)}")
    assert status == 200 and body["deleted"] == 3 and body["retrain_jobs"] == {}
    status, body, _ = await call(url, "DELETE", "/admin/logs?route=default")
    assert status == 200 and body["deleted"] == 3
    assert await ids("") == []


async def test_export_streams_many_records(adaptive_gateway: AdaptiveGateway) -> None:
    from gateway.store.base import LogRecord

    store = adaptive_gateway.gateway.app.services.store
    records = [
        LogRecord(f"req_{i}", time.time(), "default", "cloud", "/v1/chat/completions", "POST", 200, "ok")
        for i in range(1234)
    ]
    store.insert_records(records)
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.get(adaptive_gateway.url + "/admin/logs/export?route=default") as response,
    ):
        assert response.headers.get("transfer-encoding") == "chunked"
        chunks = [chunk async for chunk in response.content.iter_any()]
    lines = b"".join(chunks).splitlines()
    assert len(lines) == 1234 and orjson.loads(lines[-1])["request_id"] == "req_1233"
