"""Overload: 10x the configured capacity for 30 s against a slow fake upstream.

    .venv/bin/python bench/overload.py [--seconds 30] [--factor 10]

The gateway (own process) fronts a fake cloud answering after `--upstream-ms` with
`max_concurrency` upstream slots, a wait queue of `max_queue`, and a client key limited to
`--rpm-factor` x capacity. Capacity = max_concurrency / upstream latency. The client offers
`--factor` x capacity open-loop (a request every 1/rate s, whatever the answers) and counts
200 / 429 / 503 / anything else, hung requests (no answer within `--client-timeout`), the
p99 of admitted requests against the unloaded p99, and the gateway's RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-bench-overload"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    admitted_s: list[float] = field(default_factory=list)
    missing_retry_after: int = 0

    def add(self, status: str, latency: float, headers: Any = None) -> None:
        self.statuses[status] += 1
        if status == "200":
            self.admitted_s.append(latency)
        elif status in ("429", "503") and headers is not None and "retry-after" not in headers:
            self.missing_retry_after += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def config_text(args: argparse.Namespace, upstream_port: int, data_dir: Path) -> str:
    capacity_rps = args.concurrency / (args.upstream_ms / 1000)
    rpm = int(capacity_rps * args.rpm_factor * 60)
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return (
        f"data_dir: {data_dir}\nlocal: {{enabled: false}}\n"
        f"upstream:\n  base_url: http://127.0.0.1:{upstream_port}/v1\n"
        f"  limits: {{max_concurrency: {args.concurrency}, max_queue: {args.queue}, queue_timeout_s: 2}}\n"
        f"auth:\n  keys:\n    - {{name: bench, key_sha256: {digest}, limits: {{rpm: {rpm}}}}}\n"
    )


def start(args: argparse.Namespace, workdir: Path) -> tuple[list[subprocess.Popen[bytes]], str, int]:
    upstream_port, gateway_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    upstream = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.fakecloud", "--port", str(upstream_port)], env=env, cwd=workdir
    )
    config = workdir / "gateway.yaml"
    config.write_text(config_text(args, upstream_port, workdir / "data"))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(gateway_port)]
    gateway = subprocess.Popen([*command, "--log-level", "error"], env=env, cwd=workdir)
    wait_port(upstream_port)
    wait_port(gateway_port)
    return [upstream, gateway], f"http://127.0.0.1:{gateway_port}", gateway.pid


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, tally: Tally, hang_after_s: float
) -> None:
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    started = time.perf_counter()
    try:
        async with session.post(
            url + "/v1/chat/completions",
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=hang_after_s),
        ) as response:
            await response.read()
            tally.add(str(response.status), time.perf_counter() - started, response.headers)
    except TimeoutError:
        tally.add("hung", time.perf_counter() - started)
    except aiohttp.ClientError as exc:
        tally.add(f"error:{type(exc).__name__}", time.perf_counter() - started)


async def open_loop(url: str, body: bytes, rate: float, seconds: float, hang_after_s: float) -> Tally:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        total = int(rate * seconds)
        for i in range(total):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, body, tally, hang_after_s)))
        await asyncio.gather(*tasks)
    return tally


async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> Tally:
    tally = Tally()
    async with aiohttp.ClientSession() as session:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await one(session, url, body, tally, 30)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def rss_mib(pid: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                figures[line.split(":")[0]] = int(line.split()[1]) / 1024
    return figures


async def scrape(url: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    wanted = ("understudy_rate_limited_total", "understudy_queue_depth", "understudy_inflight_requests")
    return [line for line in text.splitlines() if line.startswith(wanted)]


async def run(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    body = json.dumps(
        {
            "model": f"slow-{args.upstream_ms}",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
        }
    ).encode()
    capacity = args.concurrency / (args.upstream_ms / 1000)
    await closed_loop(url, body, 2, 1)  # warm-up
    unloaded = await closed_loop(url, body, max(1, args.concurrency // 2), args.baseline_seconds)
    rss_before = rss_mib(pid)
    started = time.perf_counter()
    overload = await open_loop(url, body, capacity * args.factor, args.seconds, args.client_timeout)
    wall = time.perf_counter() - started
    rss_after = rss_mib(pid)
    recovered = await closed_loop(url, body, max(1, args.concurrency // 2), args.baseline_seconds)
    return {
        "capacity_rps": capacity,
        "offered_rps": capacity * args.factor,
        "seconds": args.seconds,
        "wall_s": wall,
        "unloaded_p99_ms": percentile(unloaded.admitted_s, 0.99) * 1000,
        "overload_statuses": dict(overload.statuses),
        "overload_admitted_p50_ms": percentile(overload.admitted_s, 0.5) * 1000,
        "overload_admitted_p99_ms": percentile(overload.admitted_s, 0.99) * 1000,
        "admitted_rps": len(overload.admitted_s) / wall,
        "refusals_without_retry_after": overload.missing_retry_after,
        "recovered_p99_ms": percentile(recovered.admitted_s, 0.99) * 1000,
        "gateway_rss_mib_before": rss_before,
        "gateway_rss_mib_after": rss_after,
        "metrics_after": await scrape(url),
    }


def report(r: dict[str, Any]) -> str:
    statuses = r["overload_statuses"]
    other = {k: v for k, v in statuses.items() if k not in ("200", "429", "503")}
    ratio = r["overload_admitted_p99_ms"] / r["unloaded_p99_ms"]
    return "\n".join(
        [
            f"capacity {r['capacity_rps']:.0f} req/s, offered {r['offered_rps']:.0f} req/s for {r['seconds']} s "
            f"(took {r['wall_s']:.1f} s)",
            f"200: {statuses.get('200', 0)}  429: {statuses.get('429', 0)}  503: {statuses.get('503', 0)}  "
            f"other (incl. hung): {sum(other.values())} {other or ''}",
            f"admitted {r['admitted_rps']:.1f} req/s; 429/503 without Retry-After: {r['refusals_without_retry_after']}",
            f"admitted p50 {r['overload_admitted_p50_ms']:.0f} ms, p99 {r['overload_admitted_p99_ms']:.0f} ms; "
            f"unloaded p99 {r['unloaded_p99_ms']:.0f} ms (ratio {ratio:.2f}, target <= 2); "
            f"p99 after the storm {r['recovered_p99_ms']:.0f} ms",
            f"gateway RSS before {r['gateway_rss_mib_before'].get('VmRSS', 0):.0f} MiB, after "
            f"{r['gateway_rss_mib_after'].get('VmRSS', 0):.0f} MiB (peak {r['gateway_rss_mib_after'].get('VmHWM', 0):.0f})",
            *r["metrics_after"],
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--factor", type=float, default=10, help="offered load / capacity")
    parser.add_argument("--upstream-ms", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="upstream max_concurrency")
    parser.add_argument("--queue", type=int, default=4, help="upstream max_queue")
    parser.add_argument("--rpm-factor", type=float, default=1.5, help="the key's rpm / capacity")
    parser.add_argument("--baseline-seconds", type=float, default=5)
    parser.add_argument("--client-timeout", type=float, default=30, help="longer = hung")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        processes, url, pid = start(args, Path(tmp))
        try:
            result = asyncio.run(run(args, url, pid))
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    print(report(result))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
