"""One training job per route, across processes: each job holds an exclusive `flock` on
`DATA_DIR/jobs/locks/ROUTE.lock` for its whole life. The kernel drops the lock when the process
dies however it dies, so a crash never leaves a route blocked, and a job started by hand
(`understudy train`) is seen by the gateway too."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import JobConflict
from trainer.names import validate_route

# A probe (`lock_holder`) holds a shared lock for microseconds; an acquirer retries past it.
ACQUIRE_WAIT_S = 2.0
_RETRY_S = 0.05


def lock_path(data_dir: Path, route: str) -> Path:
    return Path(data_dir) / "jobs" / "locks" / f"{validate_route(route)}.lock"


@contextmanager
def hold_route_lock(data_dir: Path, route: str, job_id: str) -> Iterator[None]:
    """Hold the route's lock (its content names `job_id`); JobConflict if another job has it."""
    path = lock_path(data_dir, route)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, route)
        os.ftruncate(fd, 0)
        os.write(fd, job_id.encode())
        yield
    finally:
        os.close(fd)


def _acquire(fd: int, route: str) -> None:
    deadline = time.monotonic() + ACQUIRE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 128, 0).decode(errors="replace").strip()
                raise JobConflict(route, holder or None) from None
            time.sleep(_RETRY_S)


def lock_holder(data_dir: Path, route: str) -> str | None:
    """The job id holding the route's lock, or None when no job runs for the route."""
    path = lock_path(data_dir, route)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 128, 0).decode(errors="replace").strip() or "unknown"
    else:
        return None
    finally:
        os.close(fd)
