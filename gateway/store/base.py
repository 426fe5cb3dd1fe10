"""The store seam: what a log record is and what every store implementation offers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Backend = Literal["cloud", "local", "failover"]
# ok: a complete answer; error: an error status or a broken upstream; disconnected: the
# client left before the end; truncated: the model stopped at max_tokens.
Outcome = Literal["ok", "error", "disconnected", "truncated"]


@dataclass(slots=True)
class LogRecord:
    """One request through the gateway. `request`/`response`/`usage` are JSON text, kept as
    the bytes came so logging never re-serialises the hot path's payloads."""

    request_id: str
    ts: float
    route: str
    backend: str
    endpoint: str
    method: str
    status: int
    outcome: str
    stream: bool = False
    model: str | None = None
    upstream_model: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request: str | None = None
    response: str | None = None
    usage: str | None = None
    error: str | None = None
    client: str | None = None
    # user: client traffic; judge / shadow: the gateway's own calls (never counted as traffic).
    kind: str = "user"
    # Why the local model did not answer on a locally served route (see gateway.adaptive.eligibility).
    local_skip: str | None = None


@dataclass(slots=True)
class EvalRecord:
    """One judged comparison of a local answer with the cloud's (JSON fields as text)."""

    ts: float
    route: str
    adapter_version: int | None
    # eval: a live request shadowed during eval; heldout: the held-out split; spot: a spot
    # check while local; manual: requested through the admin API.
    phase: str
    judge: str
    passed: bool | None
    score: float | None
    scores: str | None
    prompt: str
    cloud_answer: str | None
    local_answer: str | None
    reason: str | None = None
    error: str | None = None
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class CostEntry:
    """One line of the cost ledger. kind: `spend` (a cloud answer), `savings` (a local answer,
    at the cloud's price) or `judge` (the gateway's own calls: judging, spot checks)."""

    ts: float
    route: str
    backend: str
    kind: str
    usd: float
    client: str | None = None


# What the cost ledger may be summed by (cost_totals' `by`).
COST_GROUPS = ("day", "route", "client", "backend", "kind")


@dataclass(frozen=True, slots=True)
class RecordFilter:
    route: str | None = None
    backend: str | None = None
    status: int | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    # Page backwards from this record id (exclusive): ids only grow, so cursors are stable.
    before_id: int | None = None
    after_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Store(Protocol):
    """Durable storage of log records. Methods are blocking: call them from a worker thread."""

    def open(self) -> None: ...

    def describe(self) -> str:
        """Which store this is, for logs: its kind and where it lives (never a password)."""
        ...

    def close(self) -> None: ...

    def insert_records(self, records: Sequence[LogRecord]) -> None: ...

    def list_records(self, where: RecordFilter, limit: int) -> list[dict[str, Any]]: ...

    def iter_records(
        self, route: str | None = None, since_id: int | None = None, kind: str | None = "user"
    ) -> Iterator[dict[str, Any]]: ...

    def count_records(self, where: RecordFilter) -> int: ...

    def delete_records(self, route: str | None, before: float | None) -> int: ...

    def delete_record_ids(self, ids: Sequence[int]) -> int:
        """Delete these records (privacy deletion of derived copies), leaving no copy on disk."""
        ...

    def delete_eval_ids(self, ids: Sequence[int]) -> int:
        """Delete these eval verdicts, leaving no copy on disk."""
        ...

    def count_usable_pairs(self, route: str, after_id: int) -> tuple[int, int]:
        """(how many successful cloud chat answers of `route` have id > after_id, newest id)."""
        ...

    def load_route_state(self, route: str) -> dict[str, Any] | None: ...

    def load_route_state_versioned(self, route: str) -> tuple[dict[str, Any], int] | None:
        """(state, version) of `route`, or None before its first save."""
        ...

    def save_route_state(
        self, route: str, state: dict[str, Any], expected_version: int | None = None
    ) -> int | None:
        """Compare-and-set: write `state` if the stored version is `expected_version` (0: no
        row yet; None: whatever it is) and return the new version; None when another writer
        got there first (reload, re-apply, try again)."""
        ...

    def route_state_versions(self) -> dict[str, int]:
        """Every route's state version: what a replica polls to learn of others' changes."""
        ...

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `ttl_s` seconds; False while another holder's
        lease has not expired."""
        ...

    def release_lease(self, name: str, holder: str) -> None: ...

    def save_job(self, job_id: str, route: str, status: dict[str, Any]) -> None:
        """A training job's latest status, for every replica to read."""
        ...

    def load_job(self, job_id: str) -> dict[str, Any] | None: ...

    def add_costs(self, entries: Sequence[CostEntry]) -> None: ...

    def cost_totals(
        self, by: Sequence[str] = ("route", "kind"), route: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """USD and answer counts summed over the ledger, grouped `by` columns of COST_GROUPS."""
        ...

    def insert_eval(self, record: EvalRecord) -> int: ...

    def list_evals(self, route: str, limit: int, before_id: int | None = None) -> list[dict[str, Any]]: ...
