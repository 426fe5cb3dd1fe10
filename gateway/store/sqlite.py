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
from pathlib import Path
from typing import Any

import orjson

from gateway.store.base import CostEntry, EvalRecord, LogRecord, RecordFilter
from gateway.store.rows import EVAL_JSON_COLUMNS, cost_totals_sql, iso, row_to_dict, where_clause

__all__ = ["SQLiteStore", "iso"]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 4
_COLUMNS = [f.name for f in fields(LogRecord)]
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
    updated REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 1
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
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    status TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS costs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    day TEXT NOT NULL,
    route TEXT NOT NULL,
    client TEXT,
    backend TEXT NOT NULL,
    kind TEXT NOT NULL,
    usd REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS costs_route_day ON costs(route, day);
"""
_EVAL_COLUMNS = [f.name for f in fields(EvalRecord)]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to this schema (columns only grow; new
    tables come from the CREATE IF NOT EXISTS script)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    if "local_skip" not in have:  # schema 3
        conn.execute("ALTER TABLE records ADD COLUMN local_skip TEXT")
    have = {row[1] for row in conn.execute("PRAGMA table_info(route_state)")}
    if "version" not in have:  # schema 4: compare-and-set on route state
        conn.execute("ALTER TABLE route_state ADD COLUMN version INTEGER NOT NULL DEFAULT 1")


class SQLiteStore:
    def __init__(self, path: Path):
        if str(path).startswith("sqlite:"):
            # Path("sqlite:///abs/x.db") is the relative "sqlite:/abs/x.db": opening it would
            # create a directory named "sqlite:" wherever the process runs.
            raise ValueError(f"SQLiteStore takes a file path, not the URL {path!s}: use open_store(url)")
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
        clause, params = where_clause(where, "?")
        rows = self._conn().execute(
            f"SELECT * FROM records{clause} ORDER BY id DESC LIMIT ?", [*params, limit]
        )
        return [row_to_dict(row) for row in rows]

    def iter_records(
        self, route: str | None = None, since_id: int | None = None, kind: str | None = "user"
    ) -> Iterator[dict[str, Any]]:
        """Oldest first, in pages, so an export or a dataset never holds the table in memory."""
        last = since_id or 0
        while True:
            clause, params = where_clause(RecordFilter(route=route, kind=kind, after_id=last), "?")
            rows = (
                self._conn()
                .execute(f"SELECT * FROM records{clause} ORDER BY id ASC LIMIT 500", params)
                .fetchall()
            )
            if not rows:
                return
            for row in rows:
                yield row_to_dict(row)
            last = rows[-1]["id"]

    def count_records(self, where: RecordFilter) -> int:
        clause, params = where_clause(where, "?")
        (count,) = self._conn().execute(f"SELECT COUNT(*) FROM records{clause}", params).fetchone()
        return int(count)

    def delete_records(self, route: str | None, before: float | None) -> int:
        """Delete, and leave no copy of what was deleted on disk: secure_delete zeroes the freed
        space in the database file, and the checkpoint moves every WAL frame (which still held
        the rows as written) into it and truncates the WAL."""
        clause, params = where_clause(RecordFilter(route=route, until=before), "?")
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
        saved = self.load_route_state_versioned(route)
        return None if saved is None else saved[0]

    def load_route_state_versioned(self, route: str) -> tuple[dict[str, Any], int] | None:
        row = (
            self._conn()
            .execute("SELECT state, version FROM route_state WHERE route = ?", (route,))
            .fetchone()
        )
        return None if row is None else (dict(orjson.loads(row[0])), int(row[1]))

    def save_route_state(
        self, route: str, state: dict[str, Any], expected_version: int | None = None
    ) -> int | None:
        text, now = orjson.dumps(state).decode(), time.time()
        if expected_version is None:
            sql = (
                "INSERT INTO route_state (route, state, updated, version) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(route) DO UPDATE SET state = excluded.state, updated = excluded.updated,"
                " version = route_state.version + 1 RETURNING version"
            )
            params: tuple[Any, ...] = (route, text, now)
        elif expected_version == 0:
            sql = (
                "INSERT INTO route_state (route, state, updated, version) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(route) DO NOTHING RETURNING version"
            )
            params = (route, text, now)
        else:
            sql = (
                "UPDATE route_state SET state = ?, updated = ?, version = version + 1"
                " WHERE route = ? AND version = ? RETURNING version"
            )
            params = (text, now, route, expected_version)
        row = self._conn().execute(sql, params).fetchone()
        return None if row is None else int(row[0])

    def route_state_versions(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT route, version FROM route_state").fetchall()
        return {str(route): int(version) for route, version in rows}

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        row = (
            self._conn()
            .execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at"
                " WHERE leases.holder = excluded.holder OR leases.expires_at < ? RETURNING holder",
                (name, holder, now + ttl_s, now),
            )
            .fetchone()
        )
        return row is not None

    def release_lease(self, name: str, holder: str) -> None:
        self._conn().execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def save_job(self, job_id: str, route: str, status: dict[str, Any]) -> None:
        self._conn().execute(
            "INSERT INTO jobs (id, route, status, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET status = excluded.status, updated = excluded.updated",
            (job_id, route, orjson.dumps(status).decode(), time.time()),
        )

    def load_job(self, job_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def add_costs(self, entries: Sequence[CostEntry]) -> None:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            conn.executemany(
                "INSERT INTO costs (ts, day, route, client, backend, kind, usd) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(e.ts, iso(e.ts)[:10], e.route, e.client, e.backend, e.kind, e.usd) for e in entries],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def cost_totals(
        self, by: Sequence[str] = ("route", "kind"), route: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        sql, params = cost_totals_sql(by, route, since, "?")
        return [dict(row) for row in self._conn().execute(sql, params)]

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
        return [row_to_dict(row, EVAL_JSON_COLUMNS) for row in rows]
