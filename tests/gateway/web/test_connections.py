"""The connection guard on both of uvicorn's HTTP/1.1 protocols (httptools, which `auto`
picks here, and h11), in front of a tiny ASGI app, in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.web.connections import (
    ConnectionBook,
    ConnectionLimits,
    default_max_connections,
    guarded_protocol,
)
from tests.reliability import raw_http


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[int, ConnectionBook]]:
    book = ConnectionBook(ConnectionLimits(0.5, 0.5, 2048, 3))
    config = uvicorn.Config(
        app, http=guarded_protocol(book, request.param), log_level="warning", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1], book
    server.should_exit = True
    thread.join(10)


def until_closed(connection: socket.socket) -> bytes:
    connection.settimeout(5)
    data = b""
    while chunk := connection.recv(1 << 16):
        data += chunk
    return data


def keep_alive_get(connection: socket.socket) -> bytes:
    connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"ok"):
        data += connection.recv(1 << 16)
    return data


def test_timeouts(served: tuple[int, ConnectionBook]) -> None:
    port, book = served
    with socket.create_connection(("127.0.0.1", port)) as partial:
        partial.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        assert until_closed(partial).startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", port)) as silent:
        assert until_closed(silent) == b""
    with socket.create_connection(("127.0.0.1", port)) as body:
        body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        assert b"200" not in until_closed(body)
    # A kept-alive connection gets a fresh head deadline for its next request.
    with socket.create_connection(("127.0.0.1", port)) as kept:
        assert keep_alive_get(kept).startswith(b"HTTP/1.1 200")
        time.sleep(0.8)  # longer than the head timeout, shorter than keep-alive
        assert keep_alive_get(kept).startswith(b"HTTP/1.1 200")
    big = raw_http.request(port, "GET", "/", [("X-Big", "v" * 3000)])
    assert big is not None and big.status == 431
    assert book.stats.head_timeouts == 2 and book.stats.body_timeouts == 1 and book.stats.heads_too_large == 1


def test_the_cap_evicts_the_longest_waiting_then_refuses(served: tuple[int, ConnectionBook]) -> None:
    port, book = served
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    for connection in idle:
        keep_alive_get(connection)
    answers: list[int] = []

    def slow() -> None:
        reply = raw_http.request(port, "GET", "/slow")
        answers.append(reply.status if reply is not None else 0)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert [until_closed(connection) for connection in idle] == [b"", b""]  # evicted, oldest first
    refused = raw_http.request(port, "GET", "/")
    assert (
        refused is not None
        and refused.status == 503
        and refused.json()["error"]["code"] == "too_many_connections"
    )
    for thread in threads:
        thread.join(10)
    assert answers == [200, 200, 200] and book.stats.evicted == 2 and book.stats.refused == 1
    ok = raw_http.request(port, "GET", "/")
    assert ok is not None and ok.status == 200
    for connection in idle:
        connection.close()


def test_default_cap_leaves_room_for_upstream_sockets() -> None:
    assert default_max_connections(1024) == 480
    assert default_max_connections(65536) == 32736
    assert default_max_connections(100) == 18 and default_max_connections(64) == 16
