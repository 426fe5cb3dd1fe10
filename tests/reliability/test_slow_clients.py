"""Slow and idle clients (issue 19), against `understudy serve` as a subprocess.

- Under a lowered file-descriptor limit (1,024, soft and hard), 1,000 sockets each holding a
  partial request head must not keep normal clients out: while they are held, every normal
  request is answered. Without the connection guard the gateway runs out of descriptors and
  normal requests time out.
- A head or a body that takes too long, a head that is too large, and connections past the
  cap each get their answer: 408, a close, 431, 503 `too_many_connections`.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from gateway.demo.fakecloud import FakeCloudServer
from tests.reliability import raw_http
from tests.reliability.test_security import understudy_serve

FD_LIMIT = 1024
SLOW_SOCKETS = 1100  # more than the gateway has descriptors
NORMAL_REQUESTS = 40
CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}'
PARTIAL_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a"


def write_config(root: Path, cloud: FakeCloudServer, server: str) -> Path:
    config = root / "gateway.yaml"
    config.write_text(
        f"""
data_dir: {root / "data"}
local: {{enabled: false}}
upstream: {{base_url: {cloud.base_url}}}
server: {server}
"""
    )
    return config


@pytest.fixture(autouse=True)
def enough_descriptors_here() -> None:
    """This process holds the slow sockets: it needs more descriptors than the gateway gets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SLOW_SOCKETS + 512
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files in the test process, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class SlowAttacker:
    """Holds `count` connections, each with a request head begun and never finished, and
    opens a new one whenever the gateway closes one (as an attacker would)."""

    def __init__(self, port: int, count: int):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.reopened = 0
        self.stopping = threading.Event()
        for _ in range(count):
            self._open()
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _open(self) -> None:
        connection = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        connection.sendall(PARTIAL_HEAD)
        self.selector.register(connection, selectors.EVENT_READ)

    def _hold(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.05):
                connection = key.fileobj
                assert isinstance(connection, socket.socket)
                self.selector.unregister(connection)
                connection.close()  # the gateway closed it (or answered): open another
                if not self.stopping.is_set():
                    self._open()
                    self.reopened += 1

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


@contextlib.contextmanager
def slow_attacker(port: int, count: int) -> Iterator[SlowAttacker]:
    attacker = SlowAttacker(port, count)
    try:
        yield attacker
    finally:
        attacker.close()


def closed_by_server(connection: socket.socket) -> bool:
    connection.setblocking(False)
    try:
        return connection.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        connection.setblocking(True)


def timed(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, float]:
    """(status, seconds) of one normal request; status 0 when it got no answer in 5 s."""
    started = time.perf_counter()
    headers = [("Content-Type", "application/json")] if body else []
    try:
        reply = raw_http.send(port, raw_http.build(method, target, headers, body), timeout=5)
    except OSError:
        reply = None
    return (reply.status if reply is not None else 0), time.perf_counter() - started


def test_normal_requests_are_answered_while_slow_sockets_are_held(
    fake_cloud: FakeCloudServer, tmp_path: Path
) -> None:
    # Long head timeout: here only the connection cap keeps the slow sockets from winning.
    config = write_config(tmp_path, fake_cloud, "{header_timeout_s: 300}")
    pid: list[int] = []
    with (
        understudy_serve(config, {}, tmp_path, fd_limit=FD_LIMIT, pid=pid) as port,
        slow_attacker(port, SLOW_SOCKETS) as attacker,
    ):
        time.sleep(1.0)  # let the gateway take them all in (and the attacker reopen)
        gateway = psutil.Process(pid[0])
        fds_held = gateway.num_fds()
        print(f"gateway fds with {SLOW_SOCKETS} slow sockets held: {fds_held} of {FD_LIMIT}")
        results = []
        for i in range(NORMAL_REQUESTS):
            if i % 2:
                results.append(timed(port, "POST", "/v1/chat/completions", CHAT))
            else:
                results.append(timed(port, "GET", "/healthz"))
        fds_after = gateway.num_fds()
        reopened = attacker.reopened
    statuses = [status for status, _ in results]
    latencies = sorted(seconds for _, seconds in results)
    print(
        f"slow clients: fd limit {FD_LIMIT}, {SLOW_SOCKETS} slow sockets held open by the attacker "
        f"(it reopened {reopened} the gateway closed); gateway fds {fds_held} while held, "
        f"{fds_after} after the normal requests; {statuses.count(200)}/{NORMAL_REQUESTS} normal "
        f"requests answered 200, latency p50 {statistics.median(latencies) * 1000:.1f} ms, max "
        f"{latencies[-1] * 1000:.1f} ms"
    )
    assert statuses == [200] * NORMAL_REQUESTS, statuses
    assert fds_held < FD_LIMIT - 100 and fds_after < FD_LIMIT - 100
    assert reopened > 0  # the gateway made room by closing the slow ones


def recv_all(connection: socket.socket) -> bytes:
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := connection.recv(1 << 16):
            received += chunk
    return bytes(received)


def closes_within(connection: socket.socket, seconds: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    connection.settimeout(seconds)
    data = recv_all(connection)
    return data, time.monotonic() - started


def keep_alive_request(connection: socket.socket, target: str = "/healthz") -> int:
    connection.sendall(raw_http.build("GET", target, [("Connection", "keep-alive")]))
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(1 << 16)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += connection.recv(1 << 16)
    return int(head.split(b" ")[1])


def test_timeouts_header_cap_and_connection_cap(fake_cloud: FakeCloudServer, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        fake_cloud,
        "{header_timeout_s: 1, body_timeout_s: 1, keep_alive_timeout_s: 30, max_header_bytes: 4096,"
        " max_connections: 4}",
    )
    with understudy_serve(config, {}, tmp_path) as port:
        # Nothing sent at all: closed without a word.
        with socket.create_connection(("127.0.0.1", port)) as silent:
            data, took = closes_within(silent, 10)
        assert data == b"" and 0.8 < took < 5, (data, took)

        # Half a head: 408 in OpenAI's shape, then closed.
        with socket.create_connection(("127.0.0.1", port)) as partial:
            partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
            data, took = closes_within(partial, 10)
        reply = raw_http.parse(data)
        assert reply is not None and reply.status == 408 and 0.8 < took < 5, (data, took)
        assert reply.json()["error"]["code"] == "request_timeout"

        # A body that stops halfway: the connection closes; the proxy logs a client disconnect.
        with socket.create_connection(("127.0.0.1", port)) as body:
            body.sendall(raw_http.build("POST", "/v1/chat/completions", [("Content-Length", "1000")]))
            body.sendall(b'{"model": "x"')
            data, took = closes_within(body, 10)
        assert 0.8 < took < 5 and b"200 OK" not in data, (data, took)

        # A head over max_header_bytes: 431.
        huge = raw_http.request(port, "GET", "/healthz", [("X-Big", "v" * 5000)])
        assert huge is not None and huge.status == 431, huge
        assert huge.json()["error"]["code"] == "request_header_too_large"

        # The cap (4): two idle keep-alive connections make room for four busy ones...
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert [keep_alive_request(connection) for connection in idle] == [200, 200]
        slow_body = orjson.dumps({"model": "slow-2500", "messages": [{"role": "user", "content": "hi"}]})
        answers: list[int] = []

        def busy() -> None:
            reply = raw_http.request(
                port, "POST", "/v1/chat/completions", [("Content-Type", "application/json")], slow_body
            )
            answers.append(reply.status if reply is not None else 0)

        threads = [threading.Thread(target=busy) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # all four in flight
        assert all(closed_by_server(connection) for connection in idle)
        # ... and with four requests in flight, a fifth connection gets a clean 503.
        refused = raw_http.request(port, "GET", "/healthz")
        assert refused is not None and refused.status == 503, refused
        assert refused.json()["error"]["code"] == "too_many_connections" and refused.header("retry-after")
        for thread in threads:
            thread.join(10)
        assert answers == [200] * 4
        after = raw_http.request(port, "GET", "/healthz")
        assert after is not None and after.status == 200
        for connection in idle:
            connection.close()
    stderr = (tmp_path / "stderr").read_text()
    assert "server.max_connections" in stderr  # the operator is told
