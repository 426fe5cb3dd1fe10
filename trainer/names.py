"""Validation of names that become path components (routes, job ids)."""

from __future__ import annotations

import re
import secrets
import time

from trainer.errors import InvalidName

ROUTE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_route(name: str) -> str:
    """Return `name` if it is a safe route name (no separators, no leading dot), else raise."""
    if not isinstance(name, str) or not ROUTE_PATTERN.fullmatch(name):
        raise InvalidName(f"invalid route name {name!r}: expected {ROUTE_PATTERN.pattern}")
    return name


def validate_job_id(job_id: str) -> str:
    """Return `job_id` if it is safe as a file name and URL segment, else raise."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidName(f"invalid job id {job_id!r}: expected {JOB_ID_PATTERN.pattern}")
    return job_id


def new_job_id() -> str:
    """A fresh job id, sortable by creation time (OpenAI's `ftjob-` prefix)."""
    return f"ftjob-{int(time.time()):x}{secrets.token_hex(4)}"
