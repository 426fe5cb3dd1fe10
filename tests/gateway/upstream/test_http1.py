"""The httptools client (gateway/upstream/http1.py) against real loopback servers: a raw
asyncio server that answers as scripted per path (so each framing and fault is exact), and
the same over TLS with a certificate made for the test."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import BadUpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.http1 import CONNECT_TIMEOUT_CODE, Http1Client
from tests.gateway.proxy.test_proxy import socket_closed_port

CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawServer:
    """Answers by request path; counts connections and requests; closes on request."""

    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                path = head.split(b" ")[1].decode()
                if not await self._answer(path, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            self.open -= 1
            writer.close()

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Write the answer for `path`; False to close the connection after it."""
        body = b'{"ok": true}'
        if path.endswith("/length"):
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\nX-Request-Id: up-1\r\n"
                b"Connection: keep-alive\r\nX-Understudy-Route: spoofed\r\nOpenAI-Processing-Ms: 7\r\n\r\n"
                + body
            )
        elif path.endswith("/chunked"):
            writer.write(CHUNKED + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        elif path.endswith("/slow-stream"):
            writer.write(CHUNKED + chunk(b"data: 1\n\n"))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        elif path.endswith("/close-delimited"):
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + body
            )
            return False
        elif path.endswith("/gzip"):
            packed = gzip.compress(body * 100)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(packed), packed)
            )
        elif path.endswith("/big"):
            writer.write(CHUNKED + chunk(b"x" * 5000) + chunk(b"x" * 5000) + b"0\r\n\r\n")
        elif path.endswith("/declared-big"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + b"x" * 10000)
        elif path.endswith("/silent"):
            await asyncio.sleep(2)
            return False
        elif path.endswith("/stall"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(2)
            return False
        elif path.endswith("/cut"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body)
            return False
        elif path.endswith("/drop"):
            return False
        elif path.endswith("/once"):  # answer, then close the idle connection a moment later
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n" + body)
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        elif path.endswith("/wait"):
            await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n" + body)
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        return True

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.stop()


def client_for(url: str, **overrides: object) -> Http1Client:
    options: dict[str, object] = {
        "max_connections": 8,
        "connect_timeout": 2.0,
        "read_timeout": 0.5,
        "total_timeout": 5.0,
        "max_response_bytes": 4096,
        **overrides,
    }
    client = Http1Client("test", url, **options)  # type: ignore[arg-type]
    client.start()
    return client


async def call(client: Http1Client, path: str, body: bytes = b"{}") -> tuple[int, bytes, list[bytes]]:
    head = client.encode_head("POST", path, "", {"content-type": "application/json"}, body)
    response = await client.request("POST", head, body)
    chunks = [c async for c in response.iter_chunks()]
    return response.status, b"".join(chunks), chunks


async def test_each_framing_and_gzip_arrive_whole(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}/v1")
    head = client.encode_head("POST", "/length", "", {}, b"{}")
    response = await client.request("POST", head, b"{}")
    # as the client should see them: hop-by-hop and spoofed gateway headers gone, the id renamed
    assert response.headers == [
        (b"content-type", b"application/json"),
        (b"x-upstream-request-id", b"up-1"),
        (b"openai-processing-ms", b"7"),
    ]
    assert await response.read() == b'{"ok": true}'
    for path in ("/length", "/close-delimited"):
        status, body, _ = await call(client, path)
        assert (status, body) == (200, b'{"ok": true}'), path
    status, body, _ = await call(client, "/chunked")
    assert body == b"data: 1\n\ndata: 2\n\n"
    head = client.encode_head("POST", "/gzip", "", {}, b"{}")
    response = await client.request("POST", head, b"{}")
    assert await response.read() == b'{"ok": true}' * 100
    assert (b"content-encoding", b"gzip") not in response.headers  # decoded here, so not passed on
    assert raw_server.requests[0].startswith(b"POST /v1/length HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"accept-encoding: gzip, deflate" in raw_server.requests[0].lower()
    await client.close()


async def test_a_stream_comes_as_it_is_sent(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}")
    head = client.encode_head("POST", "/slow-stream", "", {}, b"{}")
    response = await client.request("POST", head, b"{}")
    assert response.is_event_stream
    chunks = response.iter_chunks()
    first = await anext(chunks)
    assert first == b"data: 1\n\n"  # before the second one was even written (0.2 s later)
    assert [c async for c in chunks] == [b"data: 2\n\n"]
    await client.close()


async def test_keep_alive_reuse_and_a_new_connection_after_the_server_closes(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}")
    for _ in range(3):
        assert (await call(client, "/length"))[0] == 200
    assert raw_server.connections == 1
    assert (await call(client, "/once"))[0] == 200
    await asyncio.sleep(0.2)  # the server has closed that idle connection meanwhile
    assert client.open_connections == 0
    assert (await call(client, "/length"))[0] == 200
    assert raw_server.connections == 2
    await client.close()


async def test_at_most_max_connections_the_rest_wait(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}", max_connections=2)
    results = await asyncio.gather(*(call(client, "/wait") for _ in range(6)))
    assert [status for status, _, _ in results] == [200] * 6
    assert raw_server.most_open == 2
    assert client.open_connections == 2
    await client.close()
    await asyncio.sleep(0.05)
    assert client.open_connections == 0
    assert raw_server.open == 0


async def test_answers_over_the_limit_are_refused(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}", max_response_bytes=4096)
    for path in ("/big", "/declared-big"):
        head = client.encode_head("POST", path, "", {}, b"{}")
        response = await client.request("POST", head, b"{}")
        with pytest.raises(BadUpstreamResponse, match="4096-byte limit"):
            await response.read()
    assert (await call(client, "/length"))[0] == 200  # the pool still serves
    assert client.open_connections <= 1  # a wholly received answer leaves a clean connection
    await client.close()


async def test_faults_map_to_gateway_errors_without_the_address(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}")
    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        await call(client, "/silent")
    with pytest.raises(UpstreamUnreachable, match="answer was cut off"):
        await call(client, "/cut")
    with pytest.raises(UpstreamUnreachable, match="closed the connection"):
        await call(client, "/drop")
    await client.close()
    with socket_closed_port() as port:
        refused = client_for(f"http://127.0.0.1:{port}")
        with pytest.raises(UpstreamUnreachable) as caught:
            await call(refused, "/length")
    assert "cannot connect (Connection refused)" in caught.value.message
    assert "127.0.0.1" not in caught.value.message
    # 192.0.2.0/24 (TEST-NET-1) is never routed: the connect attempt times out.
    silent = client_for("http://192.0.2.1:81", connect_timeout=0.2)
    with pytest.raises((UpstreamTimeout, UpstreamUnreachable)) as caught_timeout:
        await call(silent, "/length")
    if isinstance(caught_timeout.value, UpstreamTimeout):
        assert caught_timeout.value.code == CONNECT_TIMEOUT_CODE
    assert "192.0.2.1" not in caught_timeout.value.message


async def test_closing_a_half_read_stream_closes_its_connection(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}")
    head = client.encode_head("POST", "/slow-stream", "", {}, b"{}")
    response = await client.request("POST", head, b"{}")
    chunks = response.iter_chunks()
    await anext(chunks)
    response.close()
    with pytest.raises(UpstreamUnreachable, match="cut off"):
        await anext(chunks)
    assert client.open_connections == 0
    await asyncio.sleep(0.4)  # the server notices once it writes its next event (at 0.2 s)
    assert raw_server.open == 0
    await client.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_with_a_trusted_certificate_and_refused_without(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    server = RawServer()
    await server.start(tls=server_side)
    trusting = ssl.create_default_context(cafile=str(cert))
    client = client_for(f"https://localhost:{server.port}/v1", ssl_context=trusting)
    assert client.host_header == f"localhost:{server.port}"
    for path in ("/length", "/chunked", "/length"):
        assert (await call(client, path))[0] == 200
    assert server.connections == 1  # kept alive over TLS too
    await client.close()
    untrusting = client_for(f"https://localhost:{server.port}/v1")  # the system's CAs only
    with pytest.raises(UpstreamUnreachable, match="TLS failed"):
        await call(untrusting, "/length")
    await untrusting.close()
    await server.stop()


async def test_a_caller_giving_up_mid_answer_closes_the_connection(raw_server: RawServer) -> None:
    client = client_for(f"http://127.0.0.1:{raw_server.port}", read_timeout=5.0)
    head = client.encode_head("POST", "/stall", "", {}, b"{}")
    response = await client.request("POST", head, b"{}")
    reading = asyncio.create_task(response.read())
    await asyncio.sleep(0.05)
    assert client.open_connections == 1
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert client.open_connections == 0  # not held until the answer's timeout
    await client.close()
