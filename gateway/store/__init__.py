"""Log store: every prompt/response pair, written off the hot path, durable before the reply ends."""

from __future__ import annotations

from pathlib import Path

from gateway.store.base import LogRecord, RecordFilter, Store
from gateway.store.sqlite import SQLiteStore

__all__ = ["LogRecord", "RecordFilter", "SQLiteStore", "Store", "open_store"]


def open_store(database_url: str | None, data_dir: Path) -> Store:
    """The store named by `database_url` (empty: SQLite under `data_dir`)."""
    if not database_url:
        return SQLiteStore(data_dir / "understudy.db")
    if database_url.startswith("sqlite:///"):
        return SQLiteStore(Path(database_url.removeprefix("sqlite:///")))
    if database_url.startswith(("postgres://", "postgresql://")):
        raise NotImplementedError(
            "the PostgreSQL store is not built yet; use SQLite (leave database_url empty)"
        )
    raise ValueError(f"database_url: unsupported scheme in {database_url.split(':', 1)[0]!r}")
