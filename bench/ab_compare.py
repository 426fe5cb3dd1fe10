"""Before/after for the gateway's hot path: the working tree (or --candidate DIR) against a
git ref, both behind the same fake upstream, measured in interleaved rounds in one run.

    .venv/bin/python bench/ab_compare.py [--baseline HEAD] [--candidate DIR] [--requests 3000] [--rounds 5]

The baseline is `git archive`d into a temporary folder and run with the same interpreter
(its folder first on PYTHONPATH), so the only difference is the gateway's own code.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import REPO, free_port, run_load, start_gateway, wait_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--candidate", type=Path, default=REPO, help="a source tree (default: this one)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        upstream_port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, "-m", "gateway.demo.fakecloud", "--port", str(upstream_port)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        wait_port(upstream_port)
        gateways = {
            args.baseline: start_gateway(Path(tmp) / "a", upstream_port, base),
            str(args.candidate): start_gateway(Path(tmp) / "b", upstream_port, args.candidate),
        }
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        try:
            for _, url in gateways.values():  # warm-up
                asyncio.run(run_load(url, 500, 8))
            for _ in range(args.rounds):
                for concurrency in args.concurrency:
                    for name, (_, url) in gateways.items():
                        load = run_load(url, args.requests, concurrency)
                        results.setdefault((name, concurrency), []).append(asyncio.run(load))
        finally:
            for process in [upstream, *(gateway for gateway, _ in gateways.values())]:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    print(f"{args.requests} requests per cell, median of {args.rounds} interleaved rounds\n")
    print("| gateway | concurrency | p50 ms | p99 ms | req/s |")
    print("| --- | --- | --- | --- | --- |")
    for (name, concurrency), rounds in results.items():
        median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(
            f"| {name} | {concurrency} | {median['p50_ms']:.2f} | {median['p99_ms']:.2f} | {median['rps']:.0f} |"
        )


if __name__ == "__main__":
    main()
