"""Training jobs as supervised subprocesses, for the gateway.

`JobManager.start` launches `python -m trainer ...` in its own session (so a signal reaches
the whole process group) with stdout+stderr going to `DATA_DIR/jobs/<id>.log`; the child
writes progress to `DATA_DIR/jobs/<id>.json`. A supervisor task awaits the child's exit and
settles the file: whatever happened (exit code, signal, a crash before the first write), a
job never stays `queued` or `training` once its process is gone. `recover()` does the same on
gateway start for jobs a previous gateway left behind.

One job per route: in this process by a route → job map reserved before the first await; and
across processes by the route lock each job holds (see trainer/locks.py), which also covers
jobs started by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.adapters import AdapterRegistry
from trainer.dataset import write_jsonl
from trainer.errors import InvalidName, JobConflict
from trainer.locks import lock_holder
from trainer.names import new_job_id, validate_job_id, validate_route
from trainer.offline import OFFLINE_ENV
from trainer.progress import JobStatus, read_status, utc_now, write_status
from trainer.spec import TrainSpec

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # SIGTERM first (the job cleans its staging folder), then SIGKILL
POLL_S = 0.5  # for jobs that are not our children (left by a previous gateway)
LOG_TAIL_LINES = 3
MAX_REASON_CHARS = 800
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CHILD_ENV = {"PYTHONUNBUFFERED": "1", **OFFLINE_ENV}

OnFinish = Callable[[dict[str, Any]], None]


@dataclass
class _Job:
    job_id: str
    route: str
    process: asyncio.subprocess.Process
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    supervisor: asyncio.Task[None] | None = None


def pid_alive(pid: int | None, job_id: str) -> bool:
    """Whether `pid` is still the trainer process of `job_id` (its command line names the
    job, which guards against a recycled pid)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): the pid exists, trust it


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-empty lines of a job log, joined on one line."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)[-MAX_REASON_CHARS:]


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    if returncode == 0:
        return "exited without reporting a result"
    return f"exited with code {returncode}"


class JobManager:
    """Starts, watches, cancels and recovers training jobs under `DATA_DIR/jobs`."""

    def __init__(
        self,
        data_dir: Path,
        python: str = sys.executable,
        *,
        stop_grace_s: float = STOP_GRACE_S,
        on_finish: OnFinish | None = None,
        adapters_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.adapters_dir = adapters_dir
        self.jobs_dir = self.data_dir / "jobs"
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.on_finish = on_finish
        self._jobs: dict[str, _Job] = {}
        self._routes: dict[str, str] = {}
        self._adapters = AdapterRegistry(self.data_dir, adapters_dir)

    # --- reading --------------------------------------------------------------------------

    def status_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{validate_job_id(job_id)}.json"

    def log_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{validate_job_id(job_id)}.log"

    def failed_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{validate_job_id(job_id)}.failed.jsonl"

    def status(self, job_id: str) -> dict[str, Any] | None:
        """The job's status (the documented shape, see GET /admin/jobs/{id}, plus extras), or None for an unknown id."""
        try:
            current = read_status(self.status_path(job_id))
        except InvalidName:
            return None
        return current.model_dump(mode="json") if current else None

    def running_job(self, route: str) -> str | None:
        """Id of the job now running for `route` (here or in any other process), or None."""
        validate_route(route)
        return self._routes.get(route) or lock_holder(self.data_dir, route)

    def list_jobs(self, route: str | None = None) -> list[dict[str, Any]]:
        """Every job's status, newest first, optionally for one route."""
        found = [self.status(path.stem) for path in self.jobs_dir.glob("*.json")]
        jobs = [job for job in found if job and (route is None or job.get("route") == route)]
        return sorted(jobs, key=lambda job: job.get("created_at") or "", reverse=True)

    # --- starting and supervising ---------------------------------------------------------

    async def start(
        self, route: str, spec: TrainSpec | None = None, failed_pairs: Sequence[dict[str, Any]] = ()
    ) -> str:
        """Launch a training job for `route`; return its id at once (status `queued`).
        `failed_pairs`: pairs the candidate failed (eval rows with `prompt` and `cloud_answer`, log
        records or chats), trained on first unless their prompt is held out.
        Raises JobConflict while another job for the route runs. A process that cannot even
        be spawned leaves the job as `error` with the reason."""
        holder = self.running_job(route)
        if holder is not None:
            raise JobConflict(route, holder)
        job_id = new_job_id()
        self._routes[route] = job_id  # reserved before the first await: no double start
        queued = JobStatus(
            status="queued", message="starting the trainer", job_id=job_id, route=route, created_at=utc_now()
        )
        try:
            write_status(self.status_path(job_id), queued)
            job_spec = self._with_failed(job_id, self._located(spec or TrainSpec()), failed_pairs)
            process = await self._spawn(route, job_id, job_spec)
        except OSError as exc:
            del self._routes[route]
            failed = queued.finished("error", f"cannot start the trainer: {exc}")
            self._settle(job_id, route, failed)
            self._notify(failed)
            return job_id
        job = _Job(job_id, route, process)
        self._jobs[job_id] = job
        job.supervisor = asyncio.create_task(self._supervise(job), name=f"trainer-{job_id}")
        log.info("training job %s for route %s started (pid %d)", job_id, route, process.pid)
        return job_id

    def _located(self, spec: TrainSpec) -> TrainSpec:
        """The spec writing its adapter under this manager's adapters dir, unless it says where."""
        if spec.adapters_dir is not None or self.adapters_dir is None:
            return spec
        return spec.model_copy(update={"adapters_dir": self.adapters_dir})

    def _with_failed(self, job_id: str, spec: TrainSpec, pairs: Sequence[dict[str, Any]]) -> TrainSpec:
        """The spec pointed at the failed pairs, written next to the job's status file."""
        if not pairs:
            return spec
        path = self.failed_path(job_id)
        write_jsonl(path, pairs)
        return spec.model_copy(update={"failed_data": path})

    def _argv(self, route: str, job_id: str, spec: TrainSpec) -> list[str]:
        return [
            "-m", "trainer",
            "--route", route,
            "--job-id", job_id,
            "--data-dir", str(self.data_dir),
            "--status-file", str(self.status_path(job_id)),
            *spec.to_argv(),
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = {**_CHILD_ENV, **os.environ}
        # The child must import this very trainer package, wherever the gateway runs from.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        return env

    async def _spawn(self, route: str, job_id: str, spec: TrainSpec) -> asyncio.subprocess.Process:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(job_id).open("ab") as job_log:
            return await asyncio.create_subprocess_exec(
                self.python,
                *self._argv(route, job_id, spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=job_log,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )

    async def _supervise(self, job: _Job) -> None:
        try:
            returncode = await job.process.wait()
            final = self._conclude(job, returncode)
        finally:
            self._jobs.pop(job.job_id, None)
            if self._routes.get(job.route) == job.job_id:
                del self._routes[job.route]
            job.done.set()
        log.info("training job %s ended: %s %s", job.job_id, final.status, final.message)
        self._notify(final)

    def _notify(self, final: JobStatus) -> None:
        if self.on_finish is not None:
            self.on_finish(final.model_dump(mode="json"))

    def _conclude(self, job: _Job, returncode: int) -> JobStatus:
        """The job's final status once its process has exited, written if it changed."""
        current = read_status(self.status_path(job.job_id))
        if returncode == 0 and current is not None and current.status == "completed":
            return current
        base = current or JobStatus(status="queued", job_id=job.job_id, route=job.route)
        if job.cancelled:
            final = base.finished("error", "cancelled")
        elif current is not None and current.status == "error":
            return current  # the trainer reported its own failure, which says more
        else:
            reason = f"trainer process {exit_reason(returncode)}"
            tail = log_tail(self.log_path(job.job_id))
            final = base.finished("error", f"{reason}: {tail}" if tail else reason)
        self._settle(job.job_id, job.route, final)
        return final

    def _settle(self, job_id: str, route: str | None, final: JobStatus) -> None:
        """Write a job's final status and remove the staging folder a killed job leaves."""
        write_status(self.status_path(job_id), final)
        if route:
            self._adapters.discard_staging(route, job_id)

    # --- control --------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> bool:
        """Stop a running job (SIGTERM, then SIGKILL after the grace period); it ends as
        `error` with message "cancelled". False when the job is not running."""
        job = self._jobs.get(job_id)
        if job is None:
            return await self._cancel_foreign(job_id)
        job.cancelled = True
        _signal_group(job.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(job.done.wait(), self.stop_grace_s)
        except TimeoutError:
            _signal_group(job.process.pid, signal.SIGKILL)
            await job.done.wait()
        return True

    async def _cancel_foreign(self, job_id: str) -> bool:
        """Cancel a job run by another process (a previous gateway, or by hand)."""
        current = self._foreign_running(job_id)
        if current is None or current.pid is None:
            return False
        _signal_group(current.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_grace_s):
                await self._foreign_exit(job_id)
        except TimeoutError:
            _signal_group(current.pid, signal.SIGKILL)
            await self._foreign_exit(job_id)
        self._settle(job_id, current.route, current.finished("error", "cancelled"))
        return True

    def _foreign_running(self, job_id: str) -> JobStatus | None:
        try:
            current = read_status(self.status_path(job_id))
        except InvalidName:
            return None
        if current is None or current.terminal or not pid_alive(current.pid, job_id):
            return None
        return current

    async def _foreign_exit(self, job_id: str) -> None:
        # Not our child: there is no exit to await, only its pid (and status file) to poll.
        while self._foreign_running(job_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)

    async def wait(self, job_id: str) -> dict[str, Any] | None:
        """Wait until the job is over and return its final status (None for an unknown id).
        Bound it with `asyncio.timeout` where needed."""
        job = self._jobs.get(job_id)
        if job is not None:
            await job.done.wait()
        else:
            await self._foreign_exit(job_id)
            self._recover_one(job_id)
        return self.status(job_id)

    def recover(self) -> list[str]:
        """Mark as `error` every job whose file says queued/training but whose process is gone
        (e.g. the gateway restarted); return their ids. Jobs still running elsewhere are left
        alone: their route lock keeps them exclusive."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        return [
            job_id
            for job_id in (p.stem for p in sorted(self.jobs_dir.glob("*.json")))
            if self._recover_one(job_id)
        ]

    def _recover_one(self, job_id: str) -> bool:
        if job_id in self._jobs or job_id in self._routes.values():
            return False
        try:
            current = read_status(self.status_path(job_id))
        except (InvalidName, ValueError) as exc:
            log.warning("skipping unreadable job file %s: %s", job_id, exc)
            return False
        if current is None or current.terminal or pid_alive(current.pid, job_id):
            return False
        message = "trainer process is gone (the gateway or machine restarted while it ran)"
        self._settle(job_id, current.route, current.finished("error", message))
        log.warning("training job %s: %s", job_id, message)
        return True

    async def aclose(self, cancel_running: bool = True) -> None:
        """On gateway shutdown: cancel this manager's running jobs (or leave them to run on,
        to be found by `recover()` / `running_job()` after the restart)."""
        if cancel_running:
            await asyncio.gather(*(self.cancel(job_id) for job_id in list(self._jobs)))
