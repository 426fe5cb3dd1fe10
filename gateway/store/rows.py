"""What every store shares: record rows as the admin API shows them, and record filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.store.base import COST_GROUPS, RecordFilter

JSON_COLUMNS = ("request", "response", "usage")
EVAL_JSON_COLUMNS = ("scores", "prompt", "cloud_answer", "local_answer")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row_to_dict(row: Mapping[str, Any], json_columns: tuple[str, ...] = JSON_COLUMNS) -> dict[str, Any]:
    record = dict(row)
    record["ts"] = iso(record["ts"])
    for flag in ("stream", "passed"):
        if record.get(flag) is not None:
            record[flag] = bool(record[flag])
    for column in json_columns:
        text = record.get(column)
        if text is not None:
            record[column] = json_or_text(text)
    return record


def json_or_text(text: str) -> Any:
    """A JSON column's value; its text when it is not JSON (a non-JSON body, or one cut at the
    size cap) or nests too deeply to be written out again in a page of records: orjson reads
    1024 levels but writes 254, and a client chooses how deep its body nests."""
    try:
        value = orjson.loads(text)
        orjson.dumps([[[value]]])  # the levels a page of records puts around it
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return text
    return value


def where_clause(where: RecordFilter, placeholder: str) -> tuple[str, list[Any]]:
    """` WHERE ...` (or '') and its parameters, with the driver's `placeholder` (? or %s)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value, op in (
        ("route", where.route, "="),
        ("backend", where.backend, "="),
        ("status", where.status, "="),
        ("kind", where.kind, "="),
        ("ts", where.since, ">="),
        ("ts", where.until, "<"),
        ("id", where.before_id, "<"),
        ("id", where.after_id, ">"),
    ):
        if value is not None:
            clauses.append(f"{column} {op} {placeholder}")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def cost_totals_sql(
    by: Sequence[str], route: str | None, since: float | None, placeholder: str
) -> tuple[str, list[Any]]:
    """The ledger's sums grouped `by` (columns of COST_GROUPS only: they are spliced in)."""
    unknown = set(by) - set(COST_GROUPS)
    if unknown:
        raise ValueError(f"cannot group costs by {sorted(unknown)}")
    columns = ", ".join(by)
    where, params = [], []
    for clause, value in (("route = ", route), ("ts >= ", since)):
        if value is not None:
            where.append(clause + placeholder)
            params.append(value)
    sql = f"SELECT {columns + ', ' if by else ''}SUM(usd) AS usd, COUNT(*) AS answers FROM costs"
    sql += (" WHERE " + " AND ".join(where)) if where else ""
    sql += f" GROUP BY {columns} ORDER BY {columns}" if by else ""
    return sql, params
