"""The proxy's remaining overhead, alternative against alternative, side by side in one run.

    .venv/bin/python bench/proxy_alternatives.py [--requests 2000] [--rounds 5]

Three sections, each measured in interleaved rounds (A, B, A, B, ...), medians of rounds:

1. client: one pooled upstream call (POST, whole answer) to the fake upstream (its own
   process) from this process on uvloop: aiohttp's client against `gateway.upstream.http1`,
   per-call p50 µs one at a time, and calls/s 32 at a time.
2. writer: the log writer's round trip (submit a record, await its commit) one at a time, on
   SQLite: the writer as it is, a variant that hands each record to the thread at once
   (skipping the per-turn hand-over), and `insert_records` alone (the floor any wake-up
   scheme shares).
3. gateway: the same chat request direct to the fake upstream, through a bare uvicorn
   pass-through (no logic: read, forward, answer) on each client, the same on httptools plus
   the gateway's durable write (a record committed by its log writer before the answer), and
   through Understudy on each client (`upstream.client`); added p50 is target minus direct
   within a round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import BODY, REPO, free_port, run_load, start_gateway, wait_port

sys.path.insert(0, str(REPO))
from passthrough import bench_client

from gateway.domain.exchange import Exchange
from gateway.store.base import LogRecord
from gateway.store.sqlite import SQLiteStore
from gateway.store.writer import LogWriter

HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
PASSTHROUGH = Path(__file__).resolve().parent / "passthrough.py"


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- 1. the client ----------------------------------------------------------------------------


async def client_round(kind: str, base: str, calls: int, concurrency: int) -> dict[str, float]:
    url = base + "/v1/chat/completions"
    send: Callable[[], Awaitable[bytes]]
    if kind == "aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))

        async def send() -> bytes:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                return await response.read()

        close: Callable[[], Awaitable[None]] = session.close
    else:
        client = bench_client(base + "/v1")

        async def send() -> bytes:
            head = client.encode_head("POST", "/chat/completions", "", HEADERS, BODY)
            response = await client.request("POST", head, BODY)
            return await response.read()

        close = client.close
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for _ in counter:
            started = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - started)

    for _ in range(50):  # warm the pool
        await send()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await close()
    return {"p50_us": median(latencies) * 1e6, "rps": calls / elapsed}


def section_client(base: str, calls: int, rounds: int) -> None:
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for concurrency in (1, 32):
            for kind in ("aiohttp", "httptools"):
                result = uvloop.run(client_round(kind, base, calls, concurrency))
                results.setdefault((kind, concurrency), []).append(result)
    print(f"## 1. client: one upstream call, {calls} calls per cell, median of {rounds} rounds\n")
    print(
        "| concurrency | aiohttp p50 µs | httptools p50 µs | ratio | aiohttp calls/s | httptools calls/s | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for concurrency in (1, 32):
        a = {k: median([r[k] for r in results[("aiohttp", concurrency)]]) for k in ("p50_us", "rps")}
        h = {k: median([r[k] for r in results[("httptools", concurrency)]]) for k in ("p50_us", "rps")}
        print(
            f"| {concurrency} | {a['p50_us']:.0f} | {h['p50_us']:.0f} | {h['p50_us'] / a['p50_us']:.2f} "
            f"| {a['rps']:.0f} | {h['rps']:.0f} | {h['rps'] / a['rps']:.2f} |"
        )
    print()


# --- 2. the writer ----------------------------------------------------------------------------


class DirectHandOver(LogWriter):
    """The alternative: each record goes to the thread's queue at once (no per-turn list)."""

    def submit(self, record: LogRecord) -> asyncio.Future[bool]:
        assert self._loop is not None
        future: asyncio.Future[bool] = self._loop.create_future()
        self._submitted += 1
        self._queue.put([(record, future)])
        return future


def sample_record() -> LogRecord:
    ex = Exchange(method="POST", endpoint="/v1/chat/completions")
    ex.status, ex.model, ex.route = 200, "gpt-4o-mini", "default"
    ex.request_text = BODY.decode()
    ex.response_text = '{"choices":[{"message":{"role":"assistant","content":"Hello there, how are you?"}}]}'
    return ex.record()


async def writer_round(kind: str, store: SQLiteStore, records: int) -> float:
    latencies: list[float] = []
    if kind == "insert_records only":
        for _ in range(records):
            record = sample_record()
            started = time.perf_counter()
            store.insert_records([record])
            latencies.append(time.perf_counter() - started)
        return median(latencies) * 1e6
    writer = LogWriter(store) if kind == "as it is" else DirectHandOver(store)
    writer.start(asyncio.get_running_loop())
    for _ in range(records):
        record = sample_record()
        started = time.perf_counter()
        await writer.submit(record)
        latencies.append(time.perf_counter() - started)
    await writer.close()
    return median(latencies) * 1e6


def section_writer(records: int, rounds: int) -> None:
    kinds = ("as it is", "direct hand-over", "insert_records only")
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "records.db")
        store.open()
        for _ in range(rounds):
            for kind in kinds:
                results.setdefault(kind, []).append(uvloop.run(writer_round(kind, store, records)))
        store.close()
    print(
        f"## 2. writer: submit -> committed, one at a time, {records} records per cell, median of {rounds} rounds\n"
    )
    print("| writer | round trip p50 µs | vs as it is |")
    print("| --- | --- | --- |")
    base = median(results["as it is"])
    for kind in kinds:
        value = median(results[kind])
        print(f"| {kind} | {value:.1f} | {value / base:.2f} |")
    print()


# --- 3. the gateway ---------------------------------------------------------------------------


def start_passthrough(
    upstream_port: int, client: str, durable: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    durable_args = ["--durable", str(durable)] if durable is not None else []
    process = subprocess.Popen(
        [
            sys.executable,
            str(PASSTHROUGH),
            "--port",
            str(port),
            "--upstream-port",
            str(upstream_port),
            "--client",
            client,
            *durable_args,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_port(port)
    return process, f"http://127.0.0.1:{port}"


def section_gateway(upstream_port: int, requests: int, rounds: int, tmp: Path) -> None:
    direct = f"http://127.0.0.1:{upstream_port}"
    processes: list[subprocess.Popen[bytes]] = []
    targets: dict[str, str] = {"direct": direct}
    try:
        for client in ("aiohttp", "httptools"):
            process, url = start_passthrough(upstream_port, client)
            processes.append(process)
            targets[f"bare pass-through, {client}"] = url
        (tmp / "durable").mkdir()
        process, url = start_passthrough(upstream_port, "httptools", tmp / "durable")
        processes.append(process)
        targets["bare pass-through + durable write, httptools"] = url
        for client in ("aiohttp", "httptools"):
            extra = f"  client: {client}\n"
            process, url = start_gateway(tmp / client, upstream_port, REPO, upstream_extra=extra)
            processes.append(process)
            targets[f"Understudy, {client}"] = url
        for url in targets.values():  # warm-up
            asyncio.run(run_load(url, 300, 8))
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(rounds):
            for concurrency in (1, 32):
                round_: dict[str, dict[str, float]] = {}
                for name, url in targets.items():
                    round_[name] = asyncio.run(run_load(url, requests, concurrency))
                for name, result in round_.items():
                    result["added_ms"] = result["p50_ms"] - round_["direct"]["p50_ms"]
                    results.setdefault((name, concurrency), []).append(result)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    print(f"## 3. gateway: {requests} requests per cell, median of {rounds} interleaved rounds\n")
    print("| concurrency | target | p50 ms | added p50 ms | p99 ms | req/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, concurrency), rounds_ in results.items():
        m = {key: median([r[key] for r in rounds_]) for key in rounds_[0]}
        print(
            f"| {concurrency} | {name} | {m['p50_ms']:.3f} | {m['added_ms']:.3f} | {m['p99_ms']:.2f} | {m['rps']:.0f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=["client", "writer", "gateway"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        upstream_port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, "-m", "gateway.demo.fakecloud", "--port", str(upstream_port)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            wait_port(upstream_port)
            if "client" in args.sections:
                section_client(f"http://127.0.0.1:{upstream_port}", args.requests, args.rounds)
            if "writer" in args.sections:
                section_writer(args.requests, args.rounds)
            if "gateway" in args.sections:
                section_gateway(upstream_port, args.requests, args.rounds, Path(tmp))
        finally:
            upstream.send_signal(signal.SIGTERM)
            upstream.wait(timeout=30)


if __name__ == "__main__":
    main()
