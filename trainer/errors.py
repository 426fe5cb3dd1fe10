"""The trainer's exception tree. Every error a caller is expected to handle derives from
`TrainerError`; anything else escaping the trainer is a bug and is reported as one.

    TrainerError
    ├── InvalidName          a route or job id that could escape DATA_DIR or break a URL
    ├── DataError            no usable pairs, an unreadable data file
    ├── ModelLoadError       the base model or init adapter cannot be loaded offline
    ├── JobConflict          a job for this route is already running
    ├── JobNotFound          no such job id
    └── JobTerminated        the job process was asked to stop (SIGTERM / SIGINT)
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the trainer raises on purpose."""


class InvalidName(TrainerError, ValueError):
    """A route name or job id that does not match its allowed pattern."""


class DataError(TrainerError):
    """The training data is missing, unreadable or has no usable pairs."""


class ModelLoadError(TrainerError):
    """The base model or the adapter to continue from cannot be loaded."""


class JobConflict(TrainerError):
    """A training job for the route is already running (the admin API maps this to 409)."""

    def __init__(self, route: str, job_id: str | None) -> None:
        super().__init__(f"a training job for route {route!r} is already running ({job_id or 'unknown id'})")
        self.route = route
        self.job_id = job_id


class JobNotFound(TrainerError, KeyError):
    """No job with this id is known."""


class JobTerminated(TrainerError):
    """Raised inside a job process when it receives SIGTERM or SIGINT."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"terminated by {signal_name}")
        self.signal_name = signal_name
