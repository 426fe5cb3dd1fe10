"""Records/s a store sustains through the log writer (group commit), and with one commit per
record, for SQLite and (given a URL) PostgreSQL.

    .venv/bin/python bench/store_throughput.py [postgresql://USER@HOST:PORT/DB]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from gateway.store import open_store
from gateway.store.base import LogRecord
from gateway.store.writer import LogWriter

BODY = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + "x" * 400 + '"}]}'


def record(i: int) -> LogRecord:
    return LogRecord(
        f"req-{i}", time.time(), "bench", "cloud", "/v1/chat/completions", "POST", 200, "ok",
        request=BODY, response=BODY, usage='{"prompt_tokens": 100, "completion_tokens": 20}',
    )  # fmt: skip


async def through_writer(url: str, count: int) -> float:
    store = open_store(url)
    store.open()
    writer = LogWriter(store)
    writer.start(asyncio.get_running_loop())
    started = time.perf_counter()
    for start in range(0, count, 256):  # 256 requests finishing together, as at concurrency 256
        assert all(await asyncio.gather(*(writer.submit(record(i)) for i in range(start, start + 256))))
    elapsed = time.perf_counter() - started
    await writer.close()
    store.close()
    return count / elapsed


def one_per_commit(url: str, count: int) -> float:
    store = open_store(url)
    store.open()
    started = time.perf_counter()
    for i in range(count):
        store.insert_records([record(i)])
    elapsed = time.perf_counter() - started
    store.close()
    return count / elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        urls = [f"sqlite:///{Path(folder) / 'bench.db'}", *sys.argv[1:]]
        for url in urls:
            grouped = asyncio.run(through_writer(url, 20_480))
            single = one_per_commit(url, 2_000)
            name = open_store(url).describe().split(":", 1)[0]
            print(
                f"{name:12s} group commit {grouped:9,.0f} records/s   one commit each {single:7,.0f} records/s"
            )


if __name__ == "__main__":
    main()
