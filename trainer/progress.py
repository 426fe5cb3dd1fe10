"""The job status file: the one channel from a training process to the gateway.

Written atomically (temp file in the same folder + os.replace), so a reader never sees a half
file and a process killed mid-write leaves the previous version. The first eight fields are
the documented job status shape (GET /admin/jobs/{id}); the rest are extras (the loss curve, the stop reason, an ETA,
for the dashboard and the terminal).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "training", "completed", "error"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "error"})


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStatus(BaseModel):
    """A training job's status as served at `GET /admin/jobs/{id}`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: JobState
    message: str = ""
    current_step: int = 0
    total_steps: int = 0
    current_epoch: float = 0.0
    total_epochs: int = 0
    loss: float | None = None
    adapter_path: str | None = None
    # extras
    job_id: str | None = None
    route: str | None = None
    adapter_version: int | None = None
    eval_loss: float | None = None  # on the held-out split, once training is over
    validation_loss: float | None = None  # latest on the validation slice (what stops training)
    loss_curve: list[dict[str, int | float]] = Field(default_factory=list)  # {step, loss?, validation_loss?}
    stop_reason: str | None = None  # e.g. "early_stopping: validation loss flat for 3 evals"
    eta_seconds: float | None = None
    threads: int | None = None
    pid: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES

    def finished(self, status: JobState, message: str, **changes: Any) -> JobStatus:
        """A copy in a terminal state, stamped now."""
        return self.model_copy(
            update={"status": status, "message": message, "finished_at": utc_now(), **changes}
        )


def write_json_atomic(path: Path, payload: Any) -> None:
    """Replace `path` with `payload` as JSON, never exposing a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(payload, out, ensure_ascii=False, indent=1)
        os.chmod(temp, 0o644)  # mkstemp creates 0600; readers may run as another user
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_status(path: Path, status: JobStatus) -> None:
    stamped = status.model_copy(update={"updated_at": utc_now()})
    write_json_atomic(path, stamped.model_dump(mode="json"))


def read_status(path: Path) -> JobStatus | None:
    """The status in `path`, or None when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return JobStatus.model_validate_json(text)


StatusWatcher = Callable[[JobStatus], object]


class ProgressReporter:
    """Holds a job's current status, rewrites its file on every update and shows each new
    status to the watchers (e.g. the terminal's progress bar)."""

    def __init__(self, path: Path, initial: JobStatus, watchers: Sequence[StatusWatcher] = ()) -> None:
        self.path = path
        self.watchers = list(watchers)
        self.current = initial
        self._publish()

    def update(self, **changes: Any) -> JobStatus:
        self.current = self.current.model_copy(update=changes)
        self._publish()
        return self.current

    def finish(self, status: JobState, message: str, **changes: Any) -> JobStatus:
        self.current = self.current.finished(status, message, **changes)
        self._publish()
        return self.current

    def _publish(self) -> None:
        write_status(self.path, self.current)
        for watcher in self.watchers:
            watcher(self.current)
