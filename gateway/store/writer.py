"""The log writer: one thread that commits records in groups, off the event loop.

`submit()` returns a future the proxy awaits before it sends a response's last byte, so a
record is durable before the client has its whole answer. Under load many records share one
transaction (group commit), so the cost per record falls as traffic rises.

When the store fails (disk full, read-only, the database down), requests keep being served:
the records wait in a bounded spill and are retried with back-off; what overflows the spill is
counted as lost in `log_write_errors_total`, never dropped silently. Once a write has failed,
records handed over are answered "not durable" at once instead of waiting for the next retry
(a retry may wait seconds for a connection), until a write succeeds again.

Cost ledger lines (`add_cost`) ride along: the thread writes them after each batch, and a
timer wakes it within COST_DELAY_S when no record comes. They are not awaited by any request,
so a SIGKILL may lose the last COST_DELAY_S of them; a failing store keeps them for retry.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from gateway.store.base import CostEntry, LogRecord, Store

log = logging.getLogger("understudy.store")

_STOP: Final = object()
COST_DELAY_S: Final = 0.5
_Item = tuple[LogRecord, "asyncio.Future[bool]"]


def _resolve(futures: list[asyncio.Future[bool]], durable: bool) -> None:
    for future in futures:
        if not future.done():
            future.set_result(durable)


class LogWriter:
    def __init__(
        self,
        store: Store,
        max_batch: int = 512,
        spill_limit: int = 100_000,
        warn_depth: int = 10_000,
        on_written: Callable[[int], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
    ):
        self._store = store
        self._max_batch = max_batch
        # Records submitted during one turn of the event loop are handed to the thread as
        # one list: one queue put and one thread wake-up per turn, not per record (py-spy at
        # concurrency 32 put 15% of the gateway's samples in the per-record put and get).
        self._pending: list[_Item] = []
        self._submitted = 0
        self._taken = 0
        self._queue: queue.SimpleQueue[list[_Item] | object] = queue.SimpleQueue()
        self._spill: deque[LogRecord] = deque()
        self._spill_limit = spill_limit
        self._on_written = on_written or (lambda n: None)
        self._on_lost = on_lost or (lambda n: None)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry_at = 0.0
        self._warn_depth = warn_depth
        self._warned_at = -60.0
        self._costs: deque[CostEntry] = deque()
        self._cost_timer = False
        self._failing = False  # set by the thread, read on the event loop

    @property
    def depth(self) -> int:
        """Records accepted but not yet committed (queued plus spilled)."""
        return self._submitted - self._taken + len(self._spill)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="understudy-log-writer", daemon=True)
        self._thread.start()

    def submit(self, record: LogRecord) -> asyncio.Future[bool]:
        """Queue a record; the future resolves True once committed, False if it could not be
        (yet): the record then waits in the spill and the caller must not hold the client."""
        assert self._loop is not None, "LogWriter.start() was not called"
        future: asyncio.Future[bool] = self._loop.create_future()
        self._pending.append((record, future))
        self._submitted += 1
        if len(self._pending) == 1:
            self._loop.call_soon(self._hand_over)
        return future

    def add_cost(self, entry: CostEntry) -> None:
        """A ledger line, written off the request path (call from the event loop)."""
        self._costs.append(entry)
        if not self._cost_timer and self._loop is not None:
            self._cost_timer = True
            self._loop.call_later(COST_DELAY_S, self._wake_for_costs)

    def _wake_for_costs(self) -> None:
        self._cost_timer = False
        if self._costs:
            self._queue.put([])  # an empty hand-over: the thread wakes and writes the costs

    def _hand_over(self) -> None:
        if self._pending:
            items, self._pending = self._pending, []
            self._queue.put(items)
            if self._failing:  # the store is down: the records go to the spill, nobody waits
                _resolve([future for _, future in items], False)

    async def close(self) -> None:
        """Drain everything queued, then stop the thread."""
        if self._thread is None:
            return
        self._hand_over()
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, futures, stopping = self._take_batch()
            self._warn_if_behind()
            durable = self._write(batch)
            if futures and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(_resolve, futures, durable)
            self._write_costs()  # after the records' futures: no request waits for these
        self._final_flush()
        self._write_costs()

    def _warn_if_behind(self) -> None:
        depth = self.depth
        if depth > self._warn_depth and time.monotonic() - self._warned_at > 10:
            self._warned_at = time.monotonic()
            log.warning("log store is behind: %d records waiting to be written", depth)

    def _take_batch(self) -> tuple[list[LogRecord], list[asyncio.Future[bool]], bool]:
        timeout = max(0.0, self._retry_at - time.monotonic()) if self._spill else None
        batch: list[LogRecord] = []
        futures: list[asyncio.Future[bool]] = []
        stopping = False
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return batch, futures, stopping
        while True:
            if isinstance(item, list):
                for record, future in item:
                    batch.append(record)
                    futures.append(future)
                self._taken += len(item)
            else:
                stopping = True
            if len(batch) >= self._max_batch or stopping:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        return batch, futures, stopping

    def _write(self, batch: list[LogRecord]) -> bool:
        """Write the spill (oldest first) then `batch`; on failure keep both in the spill."""
        pending = [*self._spill, *batch] if self._spill and time.monotonic() >= self._retry_at else None
        if pending is None and self._spill:
            self._add_to_spill(batch)
            return False
        records = pending if pending is not None else batch
        if not records:
            return True
        try:
            self._store.insert_records(records)
        except Exception as exc:  # any store failure: keep serving, keep the records
            log.error("log store write failed (%s); %d records held for retry", exc, len(records))
            self._spill.clear()
            self._add_to_spill(records)
            self._retry_at = time.monotonic() + 1.0
            self._failing = True
            return False
        self._spill.clear()
        self._failing = False
        self._on_written(len(records))
        return True

    def _add_to_spill(self, records: list[LogRecord]) -> None:
        self._spill.extend(records)
        overflow = len(self._spill) - self._spill_limit
        if overflow > 0:
            for _ in range(overflow):
                self._spill.popleft()
            self._on_lost(overflow)
            log.error("log spill full: %d records lost", overflow)

    def _write_costs(self) -> None:
        if not self._costs or (self._spill and time.monotonic() < self._retry_at):
            return
        entries = [self._costs.popleft() for _ in range(len(self._costs))]
        try:
            self._store.add_costs(entries)
        except Exception as exc:  # any store failure: keep the lines for the next write
            log.error("cost ledger write failed (%s); %d lines held for retry", exc, len(entries))
            self._costs.extendleft(reversed(entries))
            while len(self._costs) > self._spill_limit:
                self._costs.pop()

    def _final_flush(self) -> None:
        if not self._spill:
            return
        self._retry_at = 0.0
        if not self._write([]):
            self._on_lost(len(self._spill))
            log.error("%d log records could not be written before shutdown", len(self._spill))
