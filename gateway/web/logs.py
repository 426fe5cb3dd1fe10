"""The request log for people and tools: filtered, cursor-paged listing, a streamed JSONL export,
deletion by route and/or time (privacy requests) and VACUUM of the store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.errors import Conflict, InvalidRequest
from gateway.privacy import forget, routes_to_retrain
from gateway.services import Services
from gateway.store.base import RecordFilter
from gateway.store.sqlite import iso
from gateway.web.common import query_choice, query_int, query_optional_int, query_time
from gateway.web.endpoints import Endpoint, Param
from gateway.web.schemas import DeleteResult, DerivedDeletion, LogPage, LogRecordOut, VacuumResult

BACKENDS = ("cloud", "local", "failover")
KINDS = ("user", "judge", "shadow")
_EXPORT_PAGE = 200
_LAST_TS = 253402300799.0  # 9999-12-31T23:59:59Z

_ROUTE = Param("route", "query", {"type": "string"}, "only this route's records")
_FILTERS = (
    _ROUTE,
    Param("backend", "query", {"type": "string", "enum": list(BACKENDS)}, "who answered"),
    Param("status", "query", {"type": "integer", "minimum": 100, "maximum": 599}, "HTTP status returned"),
    Param(
        "kind",
        "query",
        {"type": "string", "enum": list(KINDS)},
        "user: client traffic; judge/shadow: the gateway's own calls (default: all)",
    ),
    Param("since", "query", {"type": "string", "format": "date-time"}, "at or after (ISO 8601)"),
    Param("until", "query", {"type": "string", "format": "date-time"}, "before (ISO 8601)"),
)


def record_filter(request: Request, *, paged: bool) -> RecordFilter:
    cursor = request.query_params.get("cursor") if paged else None
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise InvalidRequest("'cursor' must be a cursor returned by a previous page")
    return RecordFilter(
        route=request.query_params.get("route"),
        backend=query_choice(request, "backend", BACKENDS),
        status=query_optional_int(request, "status", 100, 599),
        kind=query_choice(request, "kind", KINDS),
        since=query_time(request, "since"),
        until=query_time(request, "until"),
        before_id=int(cursor) if cursor else None,
    )


async def list_logs(request: Request, services: Services) -> LogPage:
    limit = query_int(request, "limit", 50, 1, 1000)
    where = record_filter(request, paged=True)
    rows = await asyncio.to_thread(services.store.list_records, where, limit + 1)
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return LogPage(data=[LogRecordOut.model_validate(row) for row in rows[:limit]], next_cursor=next_cursor)


def _matches(where: RecordFilter) -> Callable[[dict[str, Any]], bool]:
    # The store pages by route and kind; the other filters are applied to each row here.
    # Rows carry `ts` as the store's ISO text, which sorts like the time itself.
    since = _iso_clamped(where.since)
    until = _iso_clamped(where.until)

    def keep(row: dict[str, Any]) -> bool:
        return (
            (where.backend is None or row["backend"] == where.backend)
            and (where.status is None or row["status"] == where.status)
            and (since is None or row["ts"] >= since)
            and (until is None or row["ts"] < until)
        )

    return keep


def _iso_clamped(ts: float | None) -> str | None:
    return None if ts is None else iso(min(max(ts, 0.0), _LAST_TS))


def _next_page(rows: Iterator[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> bytes | None:
    """The next few matching records as JSONL (None when the records are exhausted)."""
    lines: list[bytes] = []
    for row in rows:
        if keep(row):
            lines.append(orjson.dumps(row) + b"\n")
            if len(lines) >= _EXPORT_PAGE:
                break
    else:
        if not lines:
            return None
    return b"".join(lines)


async def export_logs(request: Request, services: Services) -> Response:
    """Every matching record, oldest first, one JSON object a line, streamed page by page
    (never held in memory)."""
    where = record_filter(request, paged=False)
    rows = services.store.iter_records(route=where.route, kind=where.kind)
    keep = _matches(where)

    async def lines() -> AsyncIterator[bytes]:
        while (page := await asyncio.to_thread(_next_page, rows, keep)) is not None:
            yield page

    name = "".join(c for c in (where.route or "all") if c.isascii() and (c.isalnum() or c in "._-"))
    name = name[:64] or "route"
    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="understudy-{name}.jsonl"'},
    )


async def delete_logs(request: Request, services: Services) -> DeleteResult:
    route = request.query_params.get("route")
    before = query_time(request, "before")
    if route is None and before is None:
        raise InvalidRequest("give 'route' and/or 'before' (ISO 8601): refusing to delete every record")
    retrain = query_choice(request, "retrain", ("true", "false")) == "true"
    settings = services.settings
    report = await asyncio.to_thread(
        forget, services.store, settings.data_dir, route, before, settings.adapters_root
    )
    jobs = await _retrain(services, routes_to_retrain(report)) if retrain else {}
    derived = report.as_dict()
    return DeleteResult(deleted=derived.pop("records"), derived=DerivedDeletion(**derived), retrain_jobs=jobs)


async def _retrain(services: Services, routes: Iterable[str]) -> dict[str, str]:
    """Start a clean replacement for each route whose adapter saw a deleted pair."""
    controller = services.controller
    jobs: dict[str, str] = {}
    for route in routes:
        if controller is None or route not in controller.routes:
            continue
        try:
            jobs[route] = await controller.train_now(route)
        except Conflict:
            continue  # a job is running; the next one trains on the cleaned data anyway
    return jobs


async def vacuum_store(request: Request, services: Services) -> VacuumResult:
    """Give the space of deleted records back to the filesystem (SQLite's VACUUM)."""
    vacuum = getattr(services.store, "vacuum", None)
    if vacuum is None:
        raise Conflict("this store has no VACUUM", code="vacuum_unsupported")
    started = time.perf_counter()
    before, after = await asyncio.to_thread(vacuum)
    elapsed = (time.perf_counter() - started) * 1000
    return VacuumResult(bytes_before=before, bytes_after=after, duration_ms=round(elapsed, 1))


endpoints = [
    Endpoint(
        "GET",
        "/admin/logs",
        list_logs,
        "Logged requests, newest first, one page at a time",
        LogPage,
        params=(
            *_FILTERS,
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size (50)"),
            Param("cursor", "query", {"type": "string", "pattern": "^[0-9]{1,18}$"}, "from `next_cursor`"),
        ),
        errors=(400,),
    ),
    Endpoint(
        "DELETE",
        "/admin/logs",
        delete_logs,
        "Delete a route's records and/or every record before a time (at least one is required: "
        "deleting everything takes an explicit `before`), and every copy of their prompts: "
        "adapters' data splits, evals, the gateway's own calls about them, training jobs' files",
        DeleteResult,
        params=(
            _ROUTE,
            Param("before", "query", {"type": "string", "format": "date-time"}, "strictly before (ISO 8601)"),
            Param(
                "retrain",
                "query",
                {"type": "string", "enum": ["true", "false"]},
                "train a clean replacement for adapters trained on a deleted pair",
            ),
        ),
        errors=(400,),
    ),
    Endpoint(
        "POST",
        "/admin/store/vacuum",
        vacuum_store,
        "Rebuild the store's file without the space deleted records left (blocks log writes "
        "meanwhile: records wait in memory)",
        VacuumResult,
        errors=(409,),
    ),
    Endpoint(
        "GET",
        "/admin/logs/export",
        export_logs,
        "Every matching record, oldest first, as JSONL (streamed)",
        None,
        params=_FILTERS,
        errors=(400,),
        media_type="application/x-ndjson",
    ),
]
