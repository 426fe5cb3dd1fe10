"""Progress in the terminal: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from trainer.console import ConsoleProgress, Progress, format_seconds, progress_line
from trainer.progress import JobStatus


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def training(step: int, **extra: object) -> JobStatus:
    return JobStatus(
        status="training",
        message="training",
        current_step=step,
        total_steps=72,
        current_epoch=step / 18,
        loss=0.5,
        eta_seconds=(72 - step) * 1.5,
        **extra,  # type: ignore[arg-type]
    )


def test_progress_line_names_steps_losses_and_eta() -> None:
    line = progress_line(training(12, validation_loss=0.25))
    assert line == "step 12/72 (0.67 epochs) loss 0.5000 val 0.2500 eta 1m30s"
    assert format_seconds(None) == "?" and format_seconds(3725) == "1h02m"


def test_a_terminal_gets_a_bar() -> None:
    stream = Terminal()
    console = ConsoleProgress(stream)
    for step in (1, 36, 72):
        console(training(step))
    console(training(72, stop_reason="budget: 400 examples seen"))
    text = stream.getvalue()
    assert "72/72" in text and "loss 0.5000" in text and "step" in text
    assert console.bar is None  # closed once training stopped


def test_a_log_gets_a_line_per_interval_and_per_message() -> None:
    stream = io.StringIO()
    console = ConsoleProgress(stream, interval_s=3600)
    console(JobStatus(status="training", message="loading base model"))
    for step in range(1, 73):
        console(training(step))
    console(training(72).finished("completed", "adapter v1", stop_reason="max_epochs: 4 epochs"))
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[training] loading base model",
        "[training] training step 1/72 (0.06 epochs) loss 0.5000 eta 1m46s",
        "[completed] adapter v1 step 72/72 (4.00 epochs) loss 0.5000 eta 0m00s stopped: max_epochs: 4 epochs",
    ]


def test_progress_on_a_terminal_is_a_bar() -> None:
    stream = Terminal()
    with Progress("converting", unit="tensors", stream=stream) as progress:
        assert progress.bar is not None
        assert list(progress.wrap(range(272))) == list(range(272))
    text = stream.getvalue()
    assert "272/272" in text and "\r" in text
    assert text.rstrip().splitlines()[-1].startswith("converting: done in ")


def test_progress_in_a_log_is_lines_per_note_and_interval() -> None:
    stream = io.StringIO()
    with Progress("converting", unit="tensors", stream=stream, interval_s=3600) as progress:
        progress.update(0, "reading the tokenizer")
        list(progress.wrap(range(272)))
        progress.update(progress.done, "saving")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[:-1] == [
        "converting ...",
        "converting: 0 tensors (reading the tokenizer)",
        "converting: 272/272 tensors (saving)",
    ]
    assert lines[-1].startswith("converting: done in ")


def test_progress_says_when_the_task_failed() -> None:
    stream = io.StringIO()
    with contextlib.suppress(OSError), Progress("saving", stream=stream):
        raise OSError("disk full")
    assert stream.getvalue().splitlines()[-1].startswith("saving: failed in ")


def test_without_tqdm_a_terminal_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # a gateway-only install
    stream = Terminal()
    console = ConsoleProgress(stream, interval_s=3600)
    console(training(1))
    progress = Progress("demo", total=3, stream=stream)
    progress.update(2, "training")
    assert progress.bar is None
    assert "\r" not in stream.getvalue()
    assert "demo: 2/3 it (training)" in stream.getvalue().splitlines()
