"""A raw-socket HTTP/1.1 client, for requests no well-behaved client library would send:
bytes that are not UTF-8, CR/LF inside header values, absolute-form targets, dot segments."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

Header = tuple[bytes | str, bytes | str]


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def build(method: str, target: bytes | str, headers: Sequence[Header] = (), body: bytes = b"") -> bytes:
    """The request's bytes, with Host, Content-Length and Connection: close unless given."""
    names = {_bytes(name).lower() for name, _ in headers}
    lines = [_bytes(method) + b" " + _bytes(target) + b" HTTP/1.1"]
    if b"host" not in names:
        lines.append(b"Host: 127.0.0.1")
    lines += [_bytes(name) + b": " + _bytes(value) for name, value in headers]
    if b"content-length" not in names and b"transfer-encoding" not in names and (body or method != "GET"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    if b"connection" not in names:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def parse(data: bytes) -> Reply | None:
    while data.startswith(b"HTTP/1.1 1"):  # 100 Continue and friends come before the answer
        data = data.split(b"\r\n\r\n", 1)[1]
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    status_line, *header_lines = head.split(b"\r\n")
    headers = []
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")))
    reply = Reply(int(status_line.split(b" ")[1]), headers, rest)
    if (reply.header("transfer-encoding") or "").lower() == "chunked":
        reply.body = _dechunk(rest)
    elif reply.header("content-length") is not None:
        reply.body = rest[: int(reply.header("content-length") or 0)]
    return reply


def send(port: int, request: bytes, timeout: float = 30.0) -> Reply | None:
    """Send `request` (which should ask for Connection: close) and read the answer to the end;
    None when the server closed the connection without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        # The server may refuse and close before reading everything, or reset when done.
        with contextlib.suppress(OSError):
            connection.sendall(request)
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(1 << 16):
                received += chunk
    return parse(bytes(received))


def request(
    port: int, method: str, target: bytes | str, headers: Sequence[Header] = (), body: bytes = b""
) -> Reply | None:
    return send(port, build(method, target, headers, body))
