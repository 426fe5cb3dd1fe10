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
from proxy_overhead import REPO, free_port, run_load, wait_port


def start_gateway(code: Path, workdir: Path, upstream_port: int) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "gateway.yaml"
    config.write_text(
        f"upstream:\n  base_url: http://127.0.0.1:{upstream_port}/v1\nlocal:\n  enabled: false\n"
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
    process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return process


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
            [sys.executable, "-m", "gateway.fakecloud", "--port", str(upstream_port)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        wait_port(upstream_port)
        gateways = {
            args.baseline: start_gateway(base, Path(tmp) / "a", upstream_port),
            str(args.candidate): start_gateway(args.candidate, Path(tmp) / "b", upstream_port),
        }
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        try:
            for process in gateways.values():  # warm-up
                asyncio.run(run_load(process.url, 500, 8))  # type: ignore[attr-defined]
            for _ in range(args.rounds):
                for concurrency in args.concurrency:
                    for name, process in gateways.items():
                        load = run_load(process.url, args.requests, concurrency)  # type: ignore[attr-defined]
                        results.setdefault((name, concurrency), []).append(asyncio.run(load))
        finally:
            for process in [upstream, *gateways.values()]:
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
