"""Training progress in the terminal for `understudy train`: a bar (steps, loss, ETA) when
the stream is a terminal, else a plain line now and then (a job log stays readable)."""

from __future__ import annotations

import time
from typing import Any, TextIO

from tqdm import tqdm

from trainer.progress import JobStatus

LINE_INTERVAL_S = 10.0


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
        if self.bar is None and status.total_steps:
            self.bar = tqdm(total=status.total_steps, file=self.stream, unit="step", dynamic_ncols=True)
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
