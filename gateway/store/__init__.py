"""Log store: every prompt/response pair, written off the hot path, durable before the reply ends."""

from __future__ import annotations

from pathlib import Path

from gateway.store.base import LogRecord, RecordFilter, Store
from gateway.store.sqlite import SQLiteStore

__all__ = ["LogRecord", "RecordFilter", "SQLiteStore", "Store", "open_store"]


def open_store(url: str) -> Store:
    """The store named by `url` (settings validate it at load time)."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        # Imported here: psycopg is only loaded by gateways that use it.
        from gateway.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported store URL scheme {url.split(':', 1)[0]!r}")
