"""Seeding a route from OpenAI fine-tuning JSONL: every bad line reported and nothing
half-imported; a good file listed, trained on (never held out when asked), and deletable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway import cli
from gateway.demo.fakecloud import FakeCloudServer
from tests.gateway.web.admin_fixtures import ADMIN_KEY, ROUTE, AdaptiveGateway, running_adaptive_gateway
from tests.gateway.web.test_admin_api import call


def _chat(question: str, answer: str) -> bytes:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return orjson.dumps({"messages": messages})


GOOD = b"\n".join(_chat(f"question {i}", f"answer {i}") for i in range(5)) + b"\n"


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


async def test_a_file_with_bad_lines_reports_each_and_imports_nothing(
    adaptive_gateway: AdaptiveGateway,
) -> None:
    lines = [
        _chat("fine", "fine"),
        b"{not json",
        _chat("ok", "ok"),
        orjson.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        orjson.dumps({"prompt": "legacy", "completion": "format"}),
        b"",
        _chat("also fine", "yes"),
    ]
    status, body, _ = await call(
        adaptive_gateway.url, "POST", f"/admin/routes/{ROUTE}/dataset", raw=b"\n".join(lines)
    )
    assert status == 422 and body["error"]["code"] == "invalid_dataset"
    assert [e["line"] for e in body["errors"]] == [2, 4, 5]
    assert "not JSON" in body["errors"][0]["error"] and "assistant" in body["errors"][1]["error"]
    status, listing, _ = await call(adaptive_gateway.url, "GET", f"/admin/routes/{ROUTE}/datasets")
    assert status == 200 and listing["data"] == []


async def test_a_good_file_is_imported_listed_and_deleted(adaptive_gateway: AdaptiveGateway) -> None:
    path = f"/admin/routes/{ROUTE}/dataset?name=support-2025&heldout=false"
    status, created, _ = await call(adaptive_gateway.url, "POST", path, raw=GOOD)
    assert status == 201 and created["pairs"] == 5 and created["heldout"] is False
    status, listing, _ = await call(adaptive_gateway.url, "GET", f"/admin/routes/{ROUTE}/datasets")
    assert [d["id"] for d in listing["data"]] == [created["id"]] and listing["data"][0][
        "name"
    ] == "support-2025"
    data_dir = adaptive_gateway.gateway.settings.data_dir
    stored = data_dir / "imports" / ROUTE / f"{created['id']}.jsonl"
    assert [json.loads(line)["messages"][0]["content"] for line in stored.read_text().splitlines()][:2] == [
        "question 0",
        "question 1",
    ]
    status, _, _ = await call(
        adaptive_gateway.url, "DELETE", f"/admin/routes/{ROUTE}/datasets/{created['id']}"
    )
    assert status == 200 and not stored.exists()
    status, body, _ = await call(
        adaptive_gateway.url, "DELETE", f"/admin/routes/{ROUTE}/datasets/{created['id']}"
    )
    assert status == 404 and body["error"]["code"] == "import_not_found"


async def test_an_upload_over_the_limit_is_413(tmp_path: Path, fake_cloud: FakeCloudServer) -> None:
    with running_adaptive_gateway(tmp_path, fake_cloud, max_import_bytes=100) as gateway:
        status, body, _ = await call(gateway.url, "POST", f"/admin/routes/{ROUTE}/dataset", raw=GOOD)
        assert status == 413 and body["error"]["code"] == "request_too_large"


def test_the_cli_imports_reports_bad_lines_and_deletes(
    adaptive_gateway: AdaptiveGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def understudy(*argv: str) -> int:
        return cli.main([*argv, "--url", adaptive_gateway.url, "--admin-key", ADMIN_KEY])

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b"oops\n")
    assert understudy("dataset", "import", "--route", ROUTE, str(bad)) == 1
    assert "line 6: not JSON" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD)
    assert understudy("dataset", "import", "--route", ROUTE, str(good), "--train-only", "--json") == 0
    created = json.loads(capsys.readouterr().out)
    assert created["pairs"] == 5 and created["heldout"] is False and created["name"] == "good.jsonl"
    assert understudy("dataset", "list", "--route", ROUTE) == 0
    assert created["id"] in capsys.readouterr().out
    assert understudy("dataset", "delete", "--route", ROUTE, created["id"]) == 0
    capsys.readouterr()
    assert understudy("dataset", "list", "--route", ROUTE, "--json") == 0
    assert json.loads(capsys.readouterr().out)["data"] == []
