"""Proxy overhead: the same small chat request, direct to a fake upstream and through the
gateway (logging on), at concurrency 1 and 32, measured side by side in one run.

    .venv/bin/python bench/proxy_overhead.py [--requests 2000] [--rounds 3]

The fake upstream and the gateway each run in their own process; this process is the client
(aiohttp on uvloop). Each figure is the median over `rounds` interleaved rounds, so a noisy
neighbour hits both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
    }
).encode()


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


def start_gateway(
    workdir: Path, upstream_port: int, code: Path = REPO, upstream_extra: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    """`understudy serve` from the source tree `code`, logging on, local backend off, in front
    of the fake upstream; returns the process and its URL once it listens. `upstream_extra`:
    more `upstream:` settings, YAML lines indented by two spaces."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "gateway.yaml"
    config.write_text(
        f"upstream:\n  base_url: http://127.0.0.1:{upstream_port}/v1\n{upstream_extra}local:\n  enabled: false\n"
        f"data_dir: {workdir / 'data'}\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "PYTHONPATH": str(code)},
        cwd=workdir,
    )
    wait_port(port)
    return process, f"http://127.0.0.1:{port}"


def start_processes(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], str, str, int]:
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.fakecloud", "--port", str(upstream_port)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=workdir,
    )
    wait_port(upstream_port)
    gateway, url = start_gateway(workdir, upstream_port)
    return [upstream, gateway], f"http://127.0.0.1:{upstream_port}", url, gateway.pid


async def run_load(url: str, total: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    async with aiohttp.ClientSession(connector=connector) as session:
        counter = iter(range(total))

        async def worker() -> None:
            for _ in counter:
                start = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", data=BODY, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"status {response.status}")
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "rps": total / elapsed,
    }


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


async def measure(direct: str, gateway: str, total: int, rounds: int) -> dict[str, Any]:
    await run_load(direct, 300, 8)  # warm-up: connections, caches, the store's first pages
    await run_load(gateway, 300, 8)
    results: dict[str, Any] = {}
    for concurrency in (1, 32):
        sides: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(rounds):
            sides["direct"].append(await run_load(direct, total, concurrency))
            sides["gateway"].append(await run_load(gateway, total, concurrency))
        results[str(concurrency)] = {side: median_of(values) for side, values in sides.items()}
    return results


def report(results: dict[str, Any], rss: float, total: int, rounds: int) -> str:
    lines = [
        f"proxy overhead: {total} requests x {rounds} rounds per cell, median of rounds, logging on",
        f"{'concurrency':>11} {'side':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}",
    ]
    for concurrency, sides in results.items():
        for side, figures in sides.items():
            lines.append(
                f"{concurrency:>11} {side:>8} {figures['p50_ms']:8.3f} {figures['p99_ms']:8.3f} {figures['rps']:8.0f}"
            )
    c1, c32 = results["1"], results["32"]
    added = c1["gateway"]["p50_ms"] - c1["direct"]["p50_ms"]
    share = c32["gateway"]["rps"] / c32["direct"]["rps"]
    lines += [
        f"added p50 at concurrency 1: {added:.3f} ms (target < 0.5 ms)",
        f"gateway req/s at concurrency 32: {share:.0%} of direct (target >= 25%)",
        f"gateway RSS after the run: {rss:.0f} MiB",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        processes, direct, gateway, gateway_pid = start_processes(Path(tmp))
        try:
            results = asyncio.run(measure(direct, gateway, args.requests, args.rounds))
            rss = rss_mib(gateway_pid)
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    text = report(results, rss, args.requests, args.rounds)
    print(text)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy_overhead.json").write_text(
        json.dumps({"results": results, "gateway_rss_mib": rss}, indent=2)
    )


if __name__ == "__main__":
    main()
