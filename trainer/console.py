"""Progress in the terminal: a tqdm bar when the stream is a terminal, else a plain line now
and then (a job log stays readable). `ConsoleProgress` draws a training job (steps, loss,
ETA) for `understudy train`; `Progress` any other slow task (the first start's model
conversion, the demo's phases). Without tqdm (a gateway-only install) both write lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TextIO, TypeVar

from trainer.progress import JobStatus

LINE_INTERVAL_S = 10.0
T = TypeVar("T")


def bar_class(stream: TextIO) -> Any:
    """tqdm's bar when `stream` is a terminal and tqdm is installed, else None (plain lines)."""
    if not stream.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """One task's progress on `stream` (default stderr): a bar on a terminal, else a line
    when the note changes or every `interval_s`, and a last line with the time it took."""

    def __init__(
        self,
        title: str,
        total: int | None = None,
        unit: str = "it",
        stream: TextIO | None = None,
        interval_s: float = LINE_INTERVAL_S,
    ) -> None:
        self.stream = stream or sys.stderr
        self.title, self.total, self.unit, self.interval_s = title, total, unit, interval_s
        self.done, self.note = 0, ""
        self.started = self.last_line = time.monotonic()
        bar = bar_class(self.stream)
        self.bar: Any = bar and bar(total=total, desc=title, unit=unit, file=self.stream, dynamic_ncols=True)
        if self.bar is None:
            self._print(f"{title} ...")

    def update(self, done: int, note: str = "", total: int | None = None) -> None:
        changed = note != self.note
        self.done, self.note, self.total = done, note, total or self.total
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(note, refresh=True)
        elif changed or time.monotonic() - self.last_line >= self.interval_s:
            self._print(self.line())

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield `items`, counting each one done (the total is their number, when known)."""
        total = len(items) if isinstance(items, Sized) else None
        for count, item in enumerate(items, 1):
            yield item
            self.update(count, self.note, total)

    def line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.title}: {self.done}{of} {self.unit}{note}"

    def close(self, outcome: str = "done") -> None:
        elapsed = time.monotonic() - self.started
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._print(f"{self.title}: {outcome} in {elapsed:.1f} s")

    def _print(self, text: str) -> None:
        self.last_line = time.monotonic()
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.close("failed" if error is not None else "done")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def losses(status: JobStatus) -> str:
    parts = []
    if status.loss is not None:
        parts.append(f"loss {status.loss:.4f}")
    if status.validation_loss is not None:
        parts.append(f"val {status.validation_loss:.4f}")
    return " ".join(parts)


def progress_line(status: JobStatus) -> str:
    """One line: 'step 12/72 (1.0 epochs) loss 0.8312 val 0.9001 eta 1m05s'."""
    total = status.total_steps or "?"
    text = f"step {status.current_step}/{total} ({status.current_epoch:.2f} epochs)"
    if losses(status):
        text += " " + losses(status)
    return f"{text} eta {format_seconds(status.eta_seconds)}"


class ConsoleProgress:
    """A status watcher (see `ProgressReporter`) that draws the job's progress on `stream`."""

    def __init__(self, stream: TextIO, interval_s: float = LINE_INTERVAL_S) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.bar: Any = None
        self.last_line = 0.0
        self.last_message = ""
        self.bar_done = not stream.isatty()  # after training, plain lines again

    def __call__(self, status: JobStatus) -> None:
        if not self.bar_done:
            self._draw_bar(status)
        else:
            self._write_line(status)

    def _draw_bar(self, status: JobStatus) -> None:
        bar = bar_class(self.stream)
        if bar is None:
            self.bar_done = True  # no tqdm: lines
            self._write_line(status)
            return
        if self.bar is None and status.total_steps:
            self.bar = bar(total=status.total_steps, file=self.stream, unit="step", dynamic_ncols=True)
        if self.bar is None:
            return
        self.bar.update(status.current_step - self.bar.n)
        self.bar.set_postfix_str(losses(status), refresh=False)
        self.bar.set_description_str(status.message, refresh=True)
        if status.terminal or status.stop_reason:
            self.close()
            self.bar_done = True

    def _write_line(self, status: JobStatus) -> None:
        now = time.monotonic()
        changed = status.message != self.last_message
        if not (changed or status.terminal or now - self.last_line >= self.interval_s):
            return
        self.last_line, self.last_message = now, status.message
        detail = progress_line(status) if status.total_steps else ""
        reason = f" stopped: {status.stop_reason}" if status.stop_reason and status.terminal else ""
        print(f"[{status.status}] {status.message} {detail}{reason}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
