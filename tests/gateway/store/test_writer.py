"""The log writer while its store is down: requests are not held by retries, nothing is lost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.store.base import LogRecord, RecordFilter
from gateway.store.sqlite import SQLiteStore
from gateway.store.writer import LogWriter

CONNECT_WAIT_S = 1.0


class _Down(SQLiteStore):
    """While `down` is set, a write waits CONNECT_WAIT_S (a pool waiting for a connection to a
    server that is gone) and then fails, as PostgresStore does when its server stops."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = threading.Event()

    def insert_records(self, records: Sequence[LogRecord]) -> None:
        if self.down.is_set():
            time.sleep(CONNECT_WAIT_S)
            raise OSError("couldn't get a connection")
        super().insert_records(records)


def _record(n: int) -> LogRecord:
    return LogRecord(f"r{n}", time.time(), "r", "cloud", "/v1/chat/completions", "POST", 200, "ok")


async def _timed_submit(writer: LogWriter, n: int) -> tuple[bool, float]:
    started = time.monotonic()
    durable = await writer.submit(_record(n))
    return durable, time.monotonic() - started


async def test_while_the_store_is_down_no_request_waits_for_a_retry(tmp_path: Path) -> None:
    store = _Down(tmp_path / "db.sqlite")
    store.open()
    lost: list[int] = []
    writer = LogWriter(store, on_lost=lost.append)
    writer.start(asyncio.get_running_loop())
    assert await writer.submit(_record(0))
    store.down.set()
    durable, waited = await _timed_submit(writer, 1)  # the first failure is found the slow way
    assert not durable and waited >= CONNECT_WAIT_S
    waits = []
    for n in range(2, 40):  # 4 s: the writer's thread retries (and waits) several times meanwhile
        durable, waited = await _timed_submit(writer, n)
        assert not durable
        waits.append(waited)
        await asyncio.sleep(0.1)
    assert max(waits) < 0.2, waits
    store.down.clear()
    deadline = time.monotonic() + 10
    while writer.depth:  # the spill is retried, oldest first
        assert time.monotonic() < deadline, writer.depth
        await asyncio.sleep(0.1)
    assert await writer.submit(_record(40))  # back to durable before the answer
    await writer.close()
    assert lost == [] and store.count_records(RecordFilter()) == 41
    store.close()
