"""Closed-loop load generator: a fixed number of chat requests at a fixed concurrency.

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 32 [--stream]

Given several --url (replicas), requests go to them in turn (round robin), one pool for all.

Runs in its own process (aiohttp on uvloop, one pooled keep-alive connection per worker) and
prints one JSON line: latency p50/p99, requests/s, and for streams the time to the first
content token. A short warm-up (not counted) opens the connections first. Non-200 answers
are counted, not raised, so a struggling target shows up as errors in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import time

import aiohttp
import orjson

PROMPT = "Say hello in five words."


def body(model: str, stream: bool) -> bytes:
    payload: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
    }
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


def has_content(line: bytes) -> bool:
    """True for an SSE chat chunk whose first choice carries non-empty content."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return False
    try:
        chunk = orjson.loads(line[6:])
    except orjson.JSONDecodeError:
        return False
    choices = chunk.get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


class Cell:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one(
    session: aiohttp.ClientSession,
    urls: itertools.cycle[str],
    payload: bytes,
    headers: dict[str, str],
    stream: bool,
    cell: Cell,
) -> None:
    started = time.perf_counter()
    try:
        async with session.post(next(urls), data=payload, headers=headers) as response:
            if response.status != 200:
                await response.read()
                cell.error(str(response.status))
                return
            if stream:
                first: float | None = None
                async for line in response.content:
                    if first is None and has_content(line):
                        first = time.perf_counter() - started
                if first is None:
                    cell.error("no-content")
                    return
                cell.ttfts.append(first)
            else:
                await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        cell.error(type(exc).__name__)
        return
    cell.latencies.append(time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    urls = itertools.cycle([url.rstrip("/") + "/v1/chat/completions" for url in args.url])
    payload = body(args.model, args.stream)
    headers = {"content-type": "application/json", "authorization": f"Bearer {args.api_key}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def drive(total: int, cell: Cell) -> float:
            counter = iter(range(total))

            async def worker() -> None:
                for _ in counter:
                    await one(session, urls, payload, headers, args.stream, cell)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(min(args.concurrency, total))))
            return time.perf_counter() - started

        warmup = max(args.warmup, args.concurrency)
        await drive(warmup, Cell())
        cell = Cell()
        elapsed = await drive(args.requests, cell)
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "stream": args.stream,
        "warmup": warmup,
        "ok": len(cell.latencies),
        "errors": cell.errors,
        "seconds": elapsed,
        "rps": len(cell.latencies) / elapsed,
        "p50_ms": percentile(cell.latencies, 0.5) * 1000,
        "p99_ms": percentile(cell.latencies, 0.99) * 1000,
        "ttft_p50_ms": percentile(cell.ttfts, 0.5) * 1000 if args.stream else None,
        "ttft_p99_ms": percentile(cell.ttfts, 0.99) * 1000 if args.stream else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", required=True, nargs="+", help="the target's base URL (without /v1); several: in turn"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--api-key", default="sk-bench", help="sent as the Bearer token")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests first")
    parser.add_argument("--timeout", type=float, default=60, help="per request, seconds")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
