"""The cost ledger: every priced answer is a line in the store (off the request path), the
admin API and the dashboard read the sums, so spend survives a restart and two replicas'
spend adds up; the Prometheus counters stay this process's."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.pricing import PriceBook
from gateway.store.base import CostEntry, LogRecord
from gateway.store.sqlite import SQLiteStore
from gateway.store.writer import COST_DELAY_S, LogWriter
from tests.conftest import GatewayFactory, RunningGateway

SECRET = "sk-client-secret-ledger-42"


def _get(gateway: RunningGateway, path: str) -> Any:
    with urllib.request.urlopen(gateway.url + path, timeout=10) as response:  # loopback: no admin key needed
        return json.loads(response.read())


def _spend(gateway: RunningGateway, questions: list[str]) -> float:
    """Ask each question through the openai SDK; what the answers cost at litellm's prices."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=SECRET, max_retries=0)
    book, total = PriceBook(), 0.0
    for question in questions:
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question}]
        )
        assert answer.usage is not None
        total += book.cost(answer.model, answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert total > 0
    return total


def _wait_for_answers(gateway: RunningGateway, answers: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _get(gateway, "/admin/costs?by=route,client,backend,kind")["data"]
        if sum(row["answers"] for row in rows) >= answers or time.monotonic() > deadline:
            return list(rows)
        time.sleep(0.05)


def _dashboard_totals(gateway: RunningGateway, route: str = "default") -> dict[str, Any]:
    routes = _get(gateway, "/admin/dashboard")["routes"]
    return dict(next(r for r in routes if r["name"] == route)["totals"])


@pytest.fixture(params=["sqlite", "postgres"])
def store_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("postgres_url")}


def test_spend_survives_a_restart(gateway_factory: GatewayFactory, store_overrides: dict[str, Any]) -> None:
    first = gateway_factory(**store_overrides)
    spent = _spend(first, ["what is a ledger?", "and a journal?", "thanks"])
    rows = _wait_for_answers(first, 3)
    assert [(r["route"], r["client"], r["backend"], r["kind"], r["answers"]) for r in rows] == [
        ("default", "127.0.0.1", "cloud", "spend", 3)
    ]
    assert rows[0]["usd"] == pytest.approx(spent, rel=1e-6)
    first.stop()

    second = gateway_factory(**store_overrides)
    totals = _dashboard_totals(second)
    assert totals["cost_usd"] == pytest.approx(round(spent, 6), abs=1e-12)  # shown to 6 places
    assert totals["requests"]["cloud"] == 0  # request counts are this process's (its counters)
    by_day = _get(second, "/admin/costs?by=day")["data"]
    assert [row["day"] for row in by_day] == [time.strftime("%Y-%m-%d", time.gmtime())]
    assert SECRET not in json.dumps(_get(second, "/admin/costs?by=client,kind"))


def test_two_replicas_spend_is_summed(gateway_factory: GatewayFactory, postgres_url: str) -> None:
    one, two = gateway_factory(database_url=postgres_url), gateway_factory(database_url=postgres_url)
    spent = _spend(one, ["a short one"]) + _spend(
        two, ["a longer question for the second replica", "and more"]
    )
    for replica in (one, two):
        rows = _wait_for_answers(replica, 3)
        assert sum(row["answers"] for row in rows) == 3
        assert _dashboard_totals(replica)["cost_usd"] == pytest.approx(round(spent, 6), abs=1e-12)


def test_admin_costs_refuses_an_unknown_group(gateway: RunningGateway) -> None:
    for query in ("by=usd", "by=route,,kind", "by=", "since=yesterday"):
        try:
            _get(gateway, f"/admin/costs?{query}")
        except urllib.error.HTTPError as error:
            assert error.code == 400
            assert json.loads(error.read())["error"]["type"] == "invalid_request_error"
        else:
            pytest.fail(f"/admin/costs?{query} was accepted")


class _RefusingFirst(SQLiteStore):
    """Refuses the first `fail` ledger writes, as a store that is briefly down would."""

    def __init__(self, path: Path, fail: int) -> None:
        super().__init__(path)
        self.fail = fail

    def add_costs(self, entries: Any) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OSError("database is down")
        super().add_costs(entries)


async def _run_writer(store: SQLiteStore, work: Callable[[LogWriter], Any]) -> None:
    writer = LogWriter(store)
    writer.start(asyncio.get_running_loop())
    try:
        await work(writer)
    finally:
        await writer.close()


def _record(n: int) -> LogRecord:
    return LogRecord(f"r{n}", time.time(), "r", "cloud", "/v1/chat/completions", "POST", 200, "ok")


async def test_ledger_lines_are_written_without_further_records(tmp_path: Path) -> None:
    store = _RefusingFirst(tmp_path / "db.sqlite", fail=1)
    store.open()

    async def work(writer: LogWriter) -> None:
        writer.add_cost(CostEntry(time.time(), "r", "cloud", "spend", 0.5, "k1"))
        await asyncio.sleep(COST_DELAY_S * 3)  # the timer wakes the writer; the store refuses
        assert store.cost_totals(by=()) == [{"usd": None, "answers": 0}]
        assert await writer.submit(_record(2))  # the next batch carries the held line
        writer.add_cost(CostEntry(time.time(), "r", "local", "savings", 0.25, "k1"))
        await asyncio.sleep(COST_DELAY_S * 3)
        assert store.cost_totals(by=("kind",)) == [
            {"kind": "savings", "usd": 0.25, "answers": 1},
            {"kind": "spend", "usd": 0.5, "answers": 1},
        ]

    await _run_writer(store, work)
    store.close()
