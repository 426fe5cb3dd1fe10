"""Where the gateway's CPU goes under load: py-spy samples the gateway process while a
client drives plain and streamed chat requests through it (logging on).

    .venv/bin/python bench/profile_gateway.py [--seconds 20] [--concurrency 32] [--out bench/results/profile]

Writes the raw folded stacks (`profile.folded`, for flamegraph tools or speedscope) and prints
the functions with the most samples, by own time and by inclusive time, grouped by module.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import BODY, start_processes

STREAM_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()


async def drive(url: str, seconds: float, concurrency: int) -> int:
    """Requests until `seconds` are up; every fourth one streamed."""
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    done = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                body = STREAM_BODY if done % 4 == 3 else BODY
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"status {response.status}")
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def summarize(folded: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive (gateway code):"]
    ours = [(f, n) for f, n in inclusive.most_common() if "gateway/" in f]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in ours[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folded = args.out / "profile.folded"
    py_spy = Path(sys.executable).parent / "py-spy"
    with tempfile.TemporaryDirectory() as tmp:
        processes, _direct, gateway, pid = start_processes(Path(tmp))
        try:
            asyncio.run(drive(gateway, 2, args.concurrency))  # warm-up
            spy = subprocess.Popen(
                [
                    str(py_spy),
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--output",
                    str(folded),
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--duration",
                    str(int(args.seconds)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            done = asyncio.run(drive(gateway, args.seconds, args.concurrency))
            spy.wait(timeout=args.seconds + 30)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=30)
    summary = f"{done} requests in {args.seconds:.0f} s at concurrency {args.concurrency}\n" + summarize(
        folded, args.top
    )
    (args.out / "summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"\nfolded stacks: {folded}", file=sys.stderr)


if __name__ == "__main__":
    main()
