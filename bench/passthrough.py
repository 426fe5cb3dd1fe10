"""A bare pass-through proxy, the floor under any proxy built the same way: uvicorn (uvloop,
httptools) and one pooled upstream client, no logic at all: read the request, forward it,
read the whole answer, send it back. With `--durable DIR`, also the gateway's durable write:
one record committed to SQLite by the gateway's log writer before the answer goes back.
Used by `bench/proxy_alternatives.py`.

    .venv/bin/python bench/passthrough.py --port P --upstream-port U --client aiohttp|httptools [--durable DIR]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

from gateway.domain.exchange import Exchange
from gateway.store.sqlite import SQLiteStore
from gateway.store.writer import LogWriter
from gateway.upstream.http1 import Http1Client


def bench_client(base_url: str) -> Http1Client:
    """The httptools client as the gateway sets it up by default (started: call in a loop)."""
    client = Http1Client(
        "bench",
        base_url,
        max_connections=512,
        connect_timeout=10,
        read_timeout=300,
        total_timeout=600,
        max_response_bytes=1 << 28,
    )
    client.start()
    return client


def build_app(upstream: str, client: str, durable: Path | None = None) -> Any:
    session: aiohttp.ClientSession | None = None
    pool: Http1Client | None = None
    writer: LogWriter | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal session, pool, writer
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if durable is not None:
                        store = SQLiteStore(durable / "records.db")
                        store.open()
                        writer = LogWriter(store)
                        writer.start(asyncio.get_running_loop())
                    if client == "aiohttp":
                        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
                    else:
                        pool = bench_client(upstream)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {
            k.decode(): v.decode() for k, v in scope["headers"] if k not in (b"host", b"content-length")
        }
        if session is not None:
            async with session.post(upstream + scope["path"], data=body, headers=headers) as response:
                payload = await response.read()
                status, content_type = response.status, response.content_type.encode()
        else:
            assert pool is not None
            head = pool.encode_head("POST", scope["path"], "", headers, body)
            answer = await pool.request("POST", head, body)
            payload = await answer.read()
            status, content_type = answer.status, answer.content_type.encode()
        if writer is not None:
            ex = Exchange(method="POST", endpoint=scope["path"])
            ex.status, ex.request_text, ex.response_text = status, body.decode(), payload.decode()
            await writer.submit(ex.record())
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--client", choices=("aiohttp", "httptools"), required=True)
    parser.add_argument("--durable", type=Path, help="a folder for the SQLite store")
    args = parser.parse_args()
    app = build_app(f"http://127.0.0.1:{args.upstream_port}", args.client, args.durable)
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning")


if __name__ == "__main__":
    main()
