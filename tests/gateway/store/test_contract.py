"""The Store contract, run against every store: SQLite (embedded) and PostgreSQL (shared)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import open_store
from gateway.store.base import CostEntry, EvalRecord, LogRecord, RecordFilter, Store
from gateway.store.writer import LogWriter


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'understudy.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    opened.open()
    yield opened
    opened.close()


def record(i: int, route: str = "r", **fields: object) -> LogRecord:
    base: dict[str, object] = {
        "request_id": f"req-{i}",
        "ts": 1_700_000_000.0 + i,
        "route": route,
        "backend": "cloud",
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "status": 200,
        "outcome": "ok",
        "request": '{"messages": [{"role": "user", "content": "q' + str(i) + '"}]}',
        "response": '{"choices": []}',
    }
    return LogRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_records_round_trip_page_and_count(store: Store) -> None:
    store.insert_records([record(i) for i in range(7)] + [record(9, route="other", status=500)])
    newest = store.list_records(RecordFilter(route="r"), limit=3)
    assert [r["request_id"] for r in newest] == ["req-6", "req-5", "req-4"]
    assert newest[0]["request"]["messages"][0]["content"] == "q6"
    assert newest[0]["ts"].endswith("Z") and newest[0]["stream"] is False
    older = store.list_records(RecordFilter(route="r", before_id=newest[-1]["id"]), limit=100)
    assert len(older) == 4
    assert [r["request_id"] for r in store.iter_records(route="r")] == [f"req-{i}" for i in range(7)]
    assert store.count_records(RecordFilter(status=500)) == 1
    assert store.count_usable_pairs("r", 0) == (7, newest[0]["id"])


def test_a_body_with_a_nul_or_no_json_is_kept(store: Store) -> None:
    store.insert_records([record(1, request="not json\x00 at all"), record(2)])
    rows = store.list_records(RecordFilter(), limit=10)
    assert len(rows) == 2 and rows[1]["request"].startswith("not json")


def test_delete_by_route_and_time(store: Store) -> None:
    store.insert_records([record(i) for i in range(5)] + [record(10, route="keep")])
    assert store.delete_records("r", 1_700_000_000.0 + 3) == 3
    assert store.count_records(RecordFilter()) == 3


def test_evals_round_trip(store: Store) -> None:
    for passed in (True, False):
        store.insert_eval(
            EvalRecord(time.time(), "r", 1, "spot", "exact", passed, 90.0, '{"s": 90}', '{"m": 1}', "a", "b")
        )
    rows = store.list_evals("r", 10)
    assert [row["passed"] for row in rows] == [False, True]
    assert rows[0]["scores"] == {"s": 90} and rows[0]["prompt"] == {"m": 1}
    assert store.list_evals("r", 10, before_id=rows[0]["id"])[0]["passed"] is True


def test_route_state_is_compare_and_set(store: Store) -> None:
    assert store.load_route_state_versioned("r") is None
    assert store.save_route_state("r", {"mode": "cloud"}, expected_version=0) == 1
    assert store.save_route_state("r", {"mode": "eval"}, expected_version=0) is None
    assert store.save_route_state("r", {"mode": "eval"}, expected_version=1) == 2
    assert store.save_route_state("r", {"mode": "local"}, expected_version=1) is None  # stale
    assert store.load_route_state_versioned("r") == ({"mode": "eval"}, 2)
    assert store.save_route_state("r", {"mode": "local"}) == 3  # unconditional
    assert store.load_route_state("r") == {"mode": "local"}
    assert store.route_state_versions() == {"r": 3}


def test_concurrent_compare_and_set_loses_no_update(store: Store) -> None:
    """Eight writers each add ten to a counter through CAS with retries: all 80 land."""
    store.save_route_state("r", {"n": 0}, expected_version=0)

    def add_ten() -> None:
        for _ in range(10):
            while True:
                saved = store.load_route_state_versioned("r")
                assert saved is not None
                state, version = saved
                if store.save_route_state("r", {"n": state["n"] + 1}, version) is not None:
                    break

    threads = [threading.Thread(target=add_ten) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.load_route_state("r") == {"n": 80}


def test_a_lease_has_one_holder_until_it_expires(store: Store) -> None:
    assert store.acquire_lease("train/r", "a", ttl_s=0.5)
    assert not store.acquire_lease("train/r", "b", ttl_s=0.5)
    assert store.acquire_lease("train/r", "a", ttl_s=0.5)  # renewed by its holder
    time.sleep(0.6)
    assert store.acquire_lease("train/r", "b", ttl_s=30)  # expired: taken over
    store.release_lease("train/r", "a")  # not a's any more: nothing happens
    assert not store.acquire_lease("train/r", "a", ttl_s=30)
    store.release_lease("train/r", "b")
    assert store.acquire_lease("train/r", "a", ttl_s=30)


def test_job_status_and_cost_ledger(store: Store) -> None:
    store.save_job("job-1", "r", {"status": "queued"})
    store.save_job("job-1", "r", {"status": "completed", "adapter_path": "/a/r/v1"})
    assert store.load_job("job-1") == {"status": "completed", "adapter_path": "/a/r/v1"}
    assert store.load_job("nope") is None
    day = 1_700_000_000.0
    store.add_costs(
        [
            CostEntry(day, "r", "cloud", "spend", 0.25, client="k1"),
            CostEntry(day + 1, "r", "cloud", "spend", 0.5, client="k2"),
            CostEntry(day + 2, "r", "local", "savings", 0.75, client="k1"),
            CostEntry(day + 3, "s", "cloud", "judge", 0.125),
        ]
    )
    totals = store.cost_totals()
    assert [(t["route"], t["kind"], t["usd"], t["answers"]) for t in totals] == [
        ("r", "savings", 0.75, 1),
        ("r", "spend", 0.75, 2),
        ("s", "judge", 0.125, 1),
    ]
    by_client = store.cost_totals(by=("day", "client"), route="r")
    assert by_client == [
        {"day": "2023-11-14", "client": "k1", "usd": 1.0, "answers": 2},
        {"day": "2023-11-14", "client": "k2", "usd": 0.5, "answers": 1},
    ]
    with pytest.raises(ValueError):
        store.cost_totals(by=("usd; DROP TABLE costs",))


def test_reopening_keeps_everything_and_migrates_once(store_url: str) -> None:
    first = open_store(store_url)
    first.open()
    first.insert_records([record(1)])
    first.save_route_state("r", {"mode": "local"})
    first.close()
    again = open_store(store_url)
    again.open()
    assert again.count_records(RecordFilter()) == 1
    assert again.load_route_state_versioned("r") == ({"mode": "local"}, 1)
    again.close()


async def test_the_log_writer_group_commits_into_the_store(store: Store) -> None:
    written: list[int] = []
    writer = LogWriter(store, on_written=written.append)
    writer.start(asyncio.get_running_loop())
    durable = await asyncio.gather(*(writer.submit(record(i)) for i in range(300)))
    await writer.close()
    assert all(durable)
    assert sum(written) == 300 and len(written) < 300  # many records share a commit
    assert store.count_records(RecordFilter()) == 300


def test_describe_never_shows_the_password(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = postgres_url.replace("postgres@", "postgres:s3cret-pw@")
    store = open_store(url)
    caplog.set_level(logging.DEBUG)
    store.open()
    store.close()
    assert "s3cret-pw" not in store.describe() and "s3cret-pw" not in caplog.text
    assert store.describe().startswith("postgresql://postgres@127.0.0.1:")


async def test_records_wait_in_the_spill_while_postgres_refuses_and_then_land(
    postgres_server: str, postgres_url: str
) -> None:
    import psycopg

    name = postgres_url.rsplit("/", 1)[1]
    store = open_store(postgres_url)
    store.open()
    lost: list[int] = []
    writer = LogWriter(store, on_lost=lost.append)
    writer.start(asyncio.get_running_loop())
    assert await writer.submit(record(0))
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")  # type: ignore[arg-type]
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        started = time.monotonic()
        durable = await asyncio.gather(*(writer.submit(record(i)) for i in range(1, 51)))
        assert not any(durable) and time.monotonic() - started < 10  # clients are not held long
        assert writer.depth == 50
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")  # type: ignore[arg-type]
    deadline, n = time.monotonic() + 15, 51
    while not await writer.submit(record(n)):  # the spill is retried, oldest first
        assert time.monotonic() < deadline
        n += 1
        await asyncio.sleep(0.2)
    await writer.close()
    rows = store.count_records(RecordFilter())
    store.close()
    assert lost == [] and rows == n + 1 and writer.depth == 0


def test_settings_accept_a_postgres_url_and_open_store_serves_it(tmp_path: Path) -> None:
    from gateway.settings import load_settings
    from gateway.store.postgres import PostgresStore

    config = tmp_path / "gateway.yaml"
    config.write_text("database_url: postgres://u:pw@db:5432/understudy\n")
    settings = load_settings(config, environ={})
    assert settings.store_url == "postgres://u:pw@db:5432/understudy"
    store = open_store(settings.store_url)
    assert isinstance(store, PostgresStore)
    assert store.describe() == "postgresql://u@db:5432/understudy"
    config.write_text("database_url: mysql://db/understudy\n")
    with pytest.raises(Exception, match="unsupported scheme 'mysql'"):
        load_settings(config, environ={})


def test_the_trainer_reads_pairs_through_the_same_url(store_url: str, store: Store) -> None:
    from trainer.dataset import load_route_records, records_to_samples

    answer = '{"choices": [{"message": {"role": "assistant", "content": "A%d"}, "finish_reason": "stop"}]}'
    store.insert_records(
        [record(i, response=answer.replace("%d", str(i))) for i in range(3)] + [record(5, route="other")]
    )
    result = records_to_samples(load_route_records(store_url, "r"))
    assert [s["messages"][-1]["content"] for s in result.samples] == ["A0", "A1", "A2"]


def test_a_sqlite_url_is_never_taken_for_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path("sqlite:///abs/x.db") is the relative path "sqlite:/abs/x.db": a store opened on it
    would leave a directory named "sqlite:" in the working directory."""
    from gateway.store.sqlite import SQLiteStore

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for mistaken in (url, Path(url), f"sqlite:{tmp_path / 'x.db'}"):
        with pytest.raises(ValueError, match="not the URL"):
            SQLiteStore(mistaken)  # type: ignore[arg-type]
    store = open_store(url)
    store.open()
    store.close()
    assert (tmp_path / "x.db").is_file() and not (tmp_path / "sqlite:").exists()
