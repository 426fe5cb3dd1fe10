"""Security hardening (issue 19), each finding of the review as a test against a real gateway
on a loopback socket: DNS rebinding, what headers reach the upstream in each mode, and
deleted records left on disk. (Slow clients: `test_slow_clients.py`; sessions:
`tests/gateway/web/test_sessions.py`.)
"""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import orjson

from gateway.demo.fakecloud import FakeCloudServer
from tests.conftest import GatewayFactory
from tests.reliability import raw_http
from tests.reliability.test_security import is_openai_error

CHAT = "/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


def refused_for_host(reply: raw_http.Reply | None) -> bool:
    return (
        reply is not None
        and reply.status == 403
        and is_openai_error(reply)
        and reply.json()["error"]["code"] == "host_not_allowed"
    )


# --- DNS rebinding ------------------------------------------------------------------------------


def test_a_rebound_name_reaches_neither_admin_nor_ui_nor_the_upstream(
    gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer
) -> None:
    """A page on rebind.evil.example, re-pointed at 127.0.0.1, is same-origin with the
    gateway in the browser's eyes: Origin and Host both name it. No admin key is set, so
    before the fix loopback trust let it read the logs, flip modes and spend the key."""
    gateway = gateway_factory(
        upstream={"base_url": fake_cloud.base_url, "api_key": "sk-operator"},
        server_names=["gateway.internal", "*.example.com"],
    )
    port = gateway.port
    evil = f"rebind.evil.example:{port}"
    page = [("Host", evil), ("Origin", f"http://{evil}"), ("Content-Type", "text/plain")]

    # The review's reproduction: a text/plain POST needs no CORS preflight.
    mode = raw_http.request(port, "POST", "/admin/routes/default/mode", page, b'{"mode": "cloud"}')
    assert refused_for_host(mode), mode
    for target in ("/admin/logs", "/admin/routes", "/admin/dashboard", "/ui/", "/v1/models"):
        reply = raw_http.request(port, "GET", target, [("Host", evil)])
        assert refused_for_host(reply), (target, reply)
    chat = raw_http.request(port, "POST", CHAT, page, BODY)
    assert refused_for_host(chat), chat
    assert fake_cloud.cloud.requests == []  # the operator's key was not spent
    # Every /v1 request is logged, refusals included.
    records = gateway.wait_for_records(2)
    assert sorted(r["status"] for r in records) == [403, 403] and all(
        r["backend"] == "cloud" for r in records
    )

    # The name in other spellings, and names near the allowed ones, are refused too.
    for host in (
        "REBIND.evil.example",
        "rebind.evil.example.",
        "example.com",
        "gateway.internal.evil",
        "localhost.evil.example",
        "evil.localhost.example",
        "127.0.0.1.nip.io",
        "",
        "a:b:c",
    ):
        reply = raw_http.request(port, "GET", "/admin/routes", [("Host", host)])
        assert refused_for_host(reply), (host, reply)

    # The gateway's own names: addresses, localhost, server_names (any port, or none).
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        f"LOCALHOST:{port}",
        "localhost.",
        f"[::1]:{port}",
        f"app.localhost:{port}",
        f"10.1.2.3:{port}",
        f"gateway.internal:{port}",
        "Gateway.Internal",
        "api.example.com",
        f"a.b.example.com:{port + 1}",
    ):
        reply = raw_http.request(port, "GET", "/admin/routes", [("Host", host)])
        assert reply is not None and reply.status == 200, (host, reply)
    ok = raw_http.request(
        port, "POST", CHAT, [("Host", f"localhost:{port}"), ("Content-Type", "application/json")], BODY
    )
    assert ok is not None and ok.status == 200


def test_without_a_host_a_loopback_client_is_not_trusted(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    no_host = raw_http.send(gateway.port, b"GET /admin/routes HTTP/1.0\r\n\r\n")
    assert no_host is not None and no_host.status == 403 and is_openai_error(no_host), no_host
    assert "loopback" in no_host.json()["error"]["message"]
    # An SDK over HTTP/1.0 still gets /v1 (no loopback trust is involved there).
    chat = raw_http.send(
        gateway.port,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(BODY)).encode()
        + b"\r\n\r\n"
        + BODY,
    )
    assert chat is not None and chat.status == 200, chat
    two = raw_http.request(
        gateway.port, "GET", "/admin/routes", [("Host", "127.0.0.1"), ("Host", "evil.example")]
    )
    assert two is not None and two.status in (400, 403), two


# --- what reaches the upstream --------------------------------------------------------------------

KEPT_WHEN_KEYED = {
    "content-type": "application/json",
    "accept": "application/json",
    "user-agent": "OpenAI/Python 2.0.0",
    "openai-beta": "assistants=v2",
    "idempotency-key": "req-123",
    "x-stainless-lang": "python",
    "x-stainless-retry-count": "0",
}
DROPPED_WHEN_KEYED = {
    "openai-organization": "org-victim",
    "openai-project": "proj-victim",
    "cookie": "session=tenant",
    "x-forwarded-for": "10.9.9.9",
    "x-forwarded-host": "victim.example",
    "forwarded": "for=10.9.9.9",
    "x-real-ip": "10.9.9.9",
    "via": "1.1 tenant-proxy",
    "x-custom-tenant": "1",
    "api-key": "sk-tenant-1",
}


def upstream_saw(fake_cloud: FakeCloudServer) -> dict[str, str]:
    (request,) = [r for r in fake_cloud.cloud.requests if r.path == CHAT]
    return {name.lower(): value for name, value in request.headers.items()}


def test_keyed_mode_forwards_only_the_allow_list(
    gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer
) -> None:
    """With client keys the operator's upstream key is shared by every tenant: a tenant must
    not point it at another organization or project, nor pass cookies or forwarding headers."""
    gateway = gateway_factory(
        upstream={"base_url": fake_cloud.base_url, "api_key": "sk-operator"},
        auth={"keys": [{"name": "tenant", "key": "sk-tenant-1"}]},
    )
    sent = [("Authorization", "Bearer sk-tenant-1"), *KEPT_WHEN_KEYED.items(), *DROPPED_WHEN_KEYED.items()]
    reply = raw_http.request(gateway.port, "POST", CHAT, sent, BODY)
    assert reply is not None and reply.status == 200, reply
    seen = upstream_saw(fake_cloud)
    assert {name: seen.get(name) for name in KEPT_WHEN_KEYED} == KEPT_WHEN_KEYED
    assert set(DROPPED_WHEN_KEYED) & set(seen) == set(), seen
    assert seen["authorization"] == "Bearer sk-operator"


def test_transparent_mode_drops_hop_by_hop_and_connection_named_headers(
    gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer
) -> None:
    """Without client keys the client's own headers go on (its key, its organization), minus
    hop-by-hop ones: RFC 9110 7.6.1 makes every header named in Connection one of them."""
    gateway = gateway_factory()
    sent = [
        ("Authorization", "Bearer sk-client-own"),
        ("Content-Type", "application/json"),
        ("OpenAI-Organization", "org-mine"),
        ("Cookie", "a=1"),
        ("Connection", "close, X-Hop-Secret, x-other-hop"),
        ("X-Hop-Secret", "for the next hop only"),
        ("X-Other-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("X-Understudy-Route", "default"),
    ]
    reply = raw_http.request(gateway.port, "POST", CHAT, sent, BODY)
    assert reply is not None and reply.status == 200, reply
    seen = upstream_saw(fake_cloud)
    assert seen["authorization"] == "Bearer sk-client-own"
    assert seen["openai-organization"] == "org-mine" and seen["cookie"] == "a=1"
    hop = {"x-hop-secret", "x-other-hop", "keep-alive", "te", "x-understudy-route"}
    assert hop & set(seen) == set(), seen


def test_forward_headers_modes() -> None:
    from gateway.upstream.headers import forward_headers

    headers = [
        (b"authorization", b"Bearer sk-client"),
        (b"connection", b"X-A"),
        (b"x-a", b"1"),
        (b"openai-project", b"p"),
        (b"x-stainless-os", b"Linux"),
    ]
    assert forward_headers(headers, None) == {
        "authorization": "Bearer sk-client",
        "openai-project": "p",
        "x-stainless-os": "Linux",
    }
    assert forward_headers(headers, "sk-up") == {
        "authorization": "Bearer sk-up",
        "openai-project": "p",
        "x-stainless-os": "Linux",
    }
    assert forward_headers(headers, "sk-up", True) == {
        "authorization": "Bearer sk-up",
        "x-stainless-os": "Linux",
    }
    assert forward_headers(headers, None, True) == {"x-stainless-os": "Linux"}  # a client key never goes on


# --- deleted content on disk ----------------------------------------------------------------------


def disk_bytes(data_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in data_dir.rglob("understudy.db*") if path.is_file()}


def test_deleted_records_leave_the_disk_at_once(gateway_factory: GatewayFactory, data_dir: Path) -> None:
    """After DELETE /admin/logs the SQLite WAL still held the deleted prompts until the next
    checkpoint (and the freed pages in the database file held them until overwritten)."""
    gateway = gateway_factory(routes=[{"name": "keep", "match": ["keep-*"]}])
    planted, kept = f"planted-{secrets.token_hex(8)}", f"kept-{secrets.token_hex(8)}"
    for i in range(30):
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"{planted} {i} " + "x" * 3000}],
        }
        reply = raw_http.request(
            gateway.port, "POST", CHAT, [("Content-Type", "application/json")], orjson.dumps(body)
        )
        assert reply is not None and reply.status == 200
    body = {"model": "keep-1", "messages": [{"role": "user", "content": kept}]}
    raw_http.request(gateway.port, "POST", CHAT, [("Content-Type", "application/json")], orjson.dumps(body))
    assert len(gateway.wait_for_records(31)) == 31
    # Half of them into the database file (as SQLite's own checkpoints do every 1,000 pages),
    # where the freed pages would keep them; the rest stay in the WAL.
    with sqlite3.connect(data_dir / "understudy.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for i in range(30, 60):
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"{planted} {i} " + "y" * 3000}],
        }
        reply = raw_http.request(
            gateway.port, "POST", CHAT, [("Content-Type", "application/json")], orjson.dumps(body)
        )
        assert reply is not None and reply.status == 200
    assert len(gateway.wait_for_records(61)) == 61
    files = disk_bytes(data_dir)
    assert planted.encode() in files["understudy.db"] and planted.encode() in files["understudy.db-wal"]

    deleted = raw_http.request(gateway.port, "DELETE", "/admin/logs?route=default")
    assert deleted is not None and deleted.status == 200 and deleted.json()["deleted"] == 60
    files = disk_bytes(data_dir)
    assert [name for name, data in files.items() if planted.encode() in data] == []
    assert any(kept.encode() in data for data in files.values())
    assert len(files.get("understudy.db-wal", b"")) == 0  # truncated by the checkpoint

    vacuum = raw_http.request(gateway.port, "POST", "/admin/store/vacuum")
    assert vacuum is not None and vacuum.status == 200, vacuum
    sizes = vacuum.json()
    assert sizes["bytes_after"] < sizes["bytes_before"], sizes
    print(f"vacuum: {sizes['bytes_before']} -> {sizes['bytes_after']} bytes in {sizes['duration_ms']} ms")
    files = disk_bytes(data_dir)
    assert [name for name, data in files.items() if planted.encode() in data] == []
    (left,) = raw_http.request(gateway.port, "GET", "/admin/logs").json()["data"]  # type: ignore[union-attr]
    assert kept in orjson.dumps(left["request"]).decode()
    # The store still takes records after both.
    reply = raw_http.request(gateway.port, "POST", CHAT, [("Content-Type", "application/json")], BODY)
    assert reply is not None and reply.status == 200 and len(gateway.wait_for_records(2)) == 2
