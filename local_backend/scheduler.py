"""The bounded request queue in front of the model, and how jobs are grouped into batches.

One worker thread owns the model. It asks `next_work()` for either control operations
(adapter loads and unloads, which must not run while a forward pass does) or a batch: the
oldest waiting job plus every other waiting job for the same adapter, up to
`max_batch_size` sequences. A job that finds the worker idle starts at once: its prefill
and first decode step never wait for company, since later arrivals join the running batch
between decode steps anyway (`take_joinable`). Only jobs that queued while the worker was
busy (e.g. behind another adapter's batch) wait up to `window_s` from their arrival for
companions.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from local_backend.errors import Overloaded
from local_backend.jobs import GenerationJob
from local_backend.metrics import BackendMetrics


@dataclass
class ControlOp:
    """A callable the worker runs between decode steps, with a future for its result."""

    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # handed to the caller, who re-raises it
            self.future.set_exception(exc)


@dataclass
class Work:
    controls: list[ControlOp]
    jobs: list[GenerationJob]


class Scheduler:
    """Thread-safe queue of jobs and control operations for one worker thread."""

    def __init__(self, max_queue: int, max_batch_size: int, window_s: float, metrics: BackendMetrics) -> None:
        self._max_queue = max_queue
        self._max_batch_size = max_batch_size
        self._window_s = window_s
        self._metrics = metrics
        self._jobs: deque[GenerationJob] = deque()
        self._controls: deque[ControlOp] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        # Since when the worker has waited with nothing to do (a job created after this found
        # it idle); None while it runs a batch, and before it first asks for work.
        self._idle_since: float | None = None

    @property
    def depth(self) -> int:
        return len(self._jobs)

    @property
    def idle(self) -> bool:
        """Whether the worker is waiting with nothing to do (a job now would start at once)."""
        with self._cond:
            return self._idle_since is not None

    def submit(self, job: GenerationJob) -> None:
        """Queue a job, or raise Overloaded when `max_queue` jobs already wait."""
        with self._cond:
            if len(self._jobs) >= self._max_queue:
                self._metrics.rejected.inc()
                raise Overloaded(f"the local model's queue is full ({self._max_queue} requests waiting)")
            self._jobs.append(job)
            self._metrics.queue_depth.set(len(self._jobs))
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the worker thread at its next safe point; returns its future."""
        op = ControlOp(fn)
        with self._cond:
            if self._stopping:
                op.future.set_exception(RuntimeError("the engine is stopping"))
                return op.future
            self._controls.append(op)
            self._cond.notify_all()
        return op.future

    def take_controls(self) -> list[ControlOp]:
        with self._cond:
            ops = list(self._controls)
            self._controls.clear()
            return ops

    def next_work(self) -> Work | None:
        """Block until there is work; None once stopped."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._controls:
                    ops = list(self._controls)
                    self._controls.clear()
                    return Work(ops, [])
                self._drop_cancelled()
                if self._jobs:
                    if self._should_wait_for_more():
                        self._cond.wait(timeout=self._remaining_window())
                        continue
                    self._idle_since = None
                    return Work([], self._pop_batch())
                if self._idle_since is None:
                    self._idle_since = time.monotonic()
                self._cond.wait()

    def take_joinable(self, adapter_id: str | None, room: int) -> list[GenerationJob]:
        """Waiting jobs for `adapter_id` that fit in `room` sequences, taken in queue order
        up to the first job for another adapter (so a busy adapter cannot starve the rest)."""
        with self._cond:
            self._drop_cancelled()
            taken: list[GenerationJob] = []
            while self._jobs and self._jobs[0].adapter_id == adapter_id:
                if len(self._jobs[0].sequences) > room:
                    break
                job = self._jobs.popleft()
                room -= len(job.sequences)
                taken.append(job)
            if taken:
                self._metrics.queue_depth.set(len(self._jobs))
            return taken

    def stop(self) -> list[GenerationJob]:
        """Stop handing out work; return the jobs still waiting (their callers must be told)."""
        with self._cond:
            self._stopping = True
            left = list(self._jobs)
            self._jobs.clear()
            for op in self._controls:
                op.future.cancel()
            self._controls.clear()
            self._cond.notify_all()
            return left

    def _should_wait_for_more(self) -> bool:
        head = self._jobs[0]
        if self._idle_since is not None and head.created >= self._idle_since:
            return False  # it found the worker idle: start now, companions join between steps
        if self._remaining_window() <= 0:
            return False
        return self._batch_sequences(head.adapter_id) < self._max_batch_size

    def _remaining_window(self) -> float:
        return self._jobs[0].created + self._window_s - time.monotonic()

    def _batch_sequences(self, adapter_id: str | None) -> int:
        return sum(len(j.sequences) for j in self._jobs if j.adapter_id == adapter_id)

    def _pop_batch(self) -> list[GenerationJob]:
        head = self._jobs.popleft()
        batch, size, rest = [head], len(head.sequences), deque[GenerationJob]()
        while self._jobs:
            job = self._jobs.popleft()
            fits = size + len(job.sequences) <= self._max_batch_size
            if job.adapter_id == head.adapter_id and fits:
                batch.append(job)
                size += len(job.sequences)
            else:
                rest.append(job)
        self._jobs = rest
        self._metrics.queue_depth.set(len(self._jobs))
        return batch

    def _drop_cancelled(self) -> None:
        """Forget jobs whose client left while they waited."""
        if not any(job.cancelled for job in self._jobs):
            return
        for job in self._jobs:
            if job.cancelled:
                self._metrics.cancelled.inc()
                job.release()
        self._jobs = deque(job for job in self._jobs if not job.cancelled)
        self._metrics.queue_depth.set(len(self._jobs))
