"""SQLite store (WAL): the embedded default under the data dir.

WAL with synchronous=NORMAL makes a commit durable against a crash of the process (SIGKILL)
without an fsync per commit; only a power loss can take the last commits back. One writer
connection (the log writer's thread) and one reader connection per reading thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.store.base import EvalRecord, LogRecord, RecordFilter

log = logging.getLogger(__name__)
SCHEMA_VERSION = 3
_COLUMNS = [f.name for f in fields(LogRecord)]
_JSON_COLUMNS = ("request", "response", "usage")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    route TEXT NOT NULL,
    backend TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    stream INTEGER NOT NULL,
    model TEXT,
    upstream_model TEXT,
    latency_ms REAL,
    ttft_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    request TEXT,
    response TEXT,
    usage TEXT,
    error TEXT,
    client TEXT,
    kind TEXT NOT NULL DEFAULT 'user',
    local_skip TEXT
);
CREATE INDEX IF NOT EXISTS records_route_id ON records(route, id);
CREATE INDEX IF NOT EXISTS records_ts ON records(ts);
CREATE TABLE IF NOT EXISTS route_state (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    route TEXT NOT NULL,
    adapter_version INTEGER,
    phase TEXT NOT NULL,
    judge TEXT NOT NULL,
    passed INTEGER,
    score REAL,
    scores TEXT,
    prompt TEXT NOT NULL,
    cloud_answer TEXT,
    local_answer TEXT,
    reason TEXT,
    error TEXT,
    latency_ms REAL
);
CREATE INDEX IF NOT EXISTS evals_route_id ON evals(route, id);
"""
_EVAL_COLUMNS = [f.name for f in fields(EvalRecord)]
_EVAL_JSON_COLUMNS = ("scores", "prompt", "cloud_answer", "local_answer")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row_to_dict(row: sqlite3.Row, json_columns: tuple[str, ...] = _JSON_COLUMNS) -> dict[str, Any]:
    record = dict(row)
    record["ts"] = iso(record["ts"])
    for flag in ("stream", "passed"):
        if record.get(flag) is not None:
            record[flag] = bool(record[flag])
    for column in json_columns:
        text = record.get(column)
        if text is not None:
            record[column] = _json_or_text(text)
    return record


def _json_or_text(text: str) -> Any:
    """A JSON column's value; its text when it is not JSON (a non-JSON body, or one cut at the
    size cap) or nests too deeply to be written out again in a page of records: orjson reads
    1024 levels but writes 254, and a client chooses how deep its body nests."""
    try:
        value = orjson.loads(text)
        orjson.dumps([[[value]]])  # the levels a page of records puts around it
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return text
    return value


def _where(where: RecordFilter) -> tuple[str, list[Any]]:
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
            clauses.append(f"{column} {op} ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to this schema (columns only grow)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    if "local_skip" not in have:  # schema 3
        conn.execute("ALTER TABLE records ADD COLUMN local_skip TEXT")


class SQLiteStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)
            _migrate(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def insert_records(self, records: Sequence[LogRecord]) -> None:
        conn = self._conn()
        placeholders = ", ".join("?" for _ in _COLUMNS)
        sql = f"INSERT INTO records ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
        conn.execute("BEGIN")
        try:
            # Not dataclasses.astuple: it deep-copies every field (13 us a record, on the GIL).
            conn.executemany(sql, [tuple(getattr(record, c) for c in _COLUMNS) for record in records])
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk does): keep the first error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def list_records(self, where: RecordFilter, limit: int) -> list[dict[str, Any]]:
        """Newest first; page on with `RecordFilter(before_id=<last id>)`."""
        clause, params = _where(where)
        rows = self._conn().execute(
            f"SELECT * FROM records{clause} ORDER BY id DESC LIMIT ?", [*params, limit]
        )
        return [_row_to_dict(row) for row in rows]

    def iter_records(
        self, route: str | None = None, since_id: int | None = None, kind: str | None = "user"
    ) -> Iterator[dict[str, Any]]:
        """Oldest first, in pages, so an export or a dataset never holds the table in memory."""
        last = since_id or 0
        while True:
            clause, params = _where(RecordFilter(route=route, kind=kind, after_id=last))
            rows = (
                self._conn()
                .execute(f"SELECT * FROM records{clause} ORDER BY id ASC LIMIT 500", params)
                .fetchall()
            )
            if not rows:
                return
            for row in rows:
                yield _row_to_dict(row)
            last = rows[-1]["id"]

    def count_records(self, where: RecordFilter) -> int:
        clause, params = _where(where)
        (count,) = self._conn().execute(f"SELECT COUNT(*) FROM records{clause}", params).fetchone()
        return int(count)

    def delete_records(self, route: str | None, before: float | None) -> int:
        """Delete, and leave no copy of what was deleted on disk: secure_delete zeroes the freed
        space in the database file, and the checkpoint moves every WAL frame (which still held
        the rows as written) into it and truncates the WAL."""
        clause, params = _where(RecordFilter(route=route, until=before))
        conn = self._conn()
        conn.execute("PRAGMA secure_delete = ON")
        with conn:
            cursor = conn.execute(f"DELETE FROM records{clause}", params)
        self._checkpoint(conn)
        return cursor.rowcount

    def delete_record_ids(self, ids: Sequence[int]) -> int:
        return self._delete_ids("records", ids)

    def delete_eval_ids(self, ids: Sequence[int]) -> int:
        return self._delete_ids("evals", ids)

    def _delete_ids(self, table: str, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        conn = self._conn()
        conn.execute("PRAGMA secure_delete = ON")
        deleted = 0
        with conn:
            for start in range(0, len(ids), 500):  # SQLite caps bound parameters
                chunk = [int(i) for i in ids[start : start + 500]]
                marks = ", ".join("?" for _ in chunk)
                deleted += conn.execute(f"DELETE FROM {table} WHERE id IN ({marks})", chunk).rowcount
        self._checkpoint(conn)
        return deleted

    def vacuum(self) -> tuple[int, int]:
        """Rebuild the database file without its free pages; (bytes before, bytes after), the
        WAL included. Log writes wait meanwhile (they spill and retry if it takes long)."""
        before = self._disk_bytes()
        conn = self._conn()
        conn.execute("VACUUM")
        self._checkpoint(conn)
        return before, self._disk_bytes()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            # A reader still holds an old snapshot: the frames go at the next checkpoint.
            log.warning("WAL checkpoint after a delete was blocked by a reader; it runs again later")

    def _disk_bytes(self) -> int:
        paths = (self.path, self.path.with_name(self.path.name + "-wal"))
        return sum(path.stat().st_size for path in paths if path.exists())

    def count_usable_pairs(self, route: str, after_id: int) -> tuple[int, int]:
        count, newest = (
            self._conn()
            .execute(
                "SELECT COUNT(*), COALESCE(MAX(id), ?) FROM records WHERE route = ? AND id > ? AND kind = 'user'"
                " AND backend = 'cloud' AND status = 200 AND outcome = 'ok' AND endpoint = '/v1/chat/completions'",
                (after_id, route, after_id),
            )
            .fetchone()
        )
        return int(count), int(newest)

    def load_route_state(self, route: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT state FROM route_state WHERE route = ?", (route,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def save_route_state(self, route: str, state: dict[str, Any]) -> None:
        self._conn().execute(
            "INSERT INTO route_state (route, state, updated) VALUES (?, ?, ?)"
            " ON CONFLICT(route) DO UPDATE SET state = excluded.state, updated = excluded.updated",
            (route, orjson.dumps(state).decode(), time.time()),
        )

    def insert_eval(self, record: EvalRecord) -> int:
        placeholders = ", ".join("?" for _ in _EVAL_COLUMNS)
        cursor = self._conn().execute(
            f"INSERT INTO evals ({', '.join(_EVAL_COLUMNS)}) VALUES ({placeholders})",
            tuple(getattr(record, c) for c in _EVAL_COLUMNS),
        )
        return int(cursor.lastrowid or 0)

    def list_evals(self, route: str, limit: int, before_id: int | None = None) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT * FROM evals WHERE route = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (route, before_id or 2**62, limit),
        )
        return [_row_to_dict(row, _EVAL_JSON_COLUMNS) for row in rows]
