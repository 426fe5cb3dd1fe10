"""Every admin verb of the CLI (`understudy route|logs|jobs ...`, `--version`) against a live
gateway with an adaptive route."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import cli
from gateway.demo.fakecloud import FakeCloudServer
from tests.gateway.web.admin_fixtures import ADMIN_KEY, ROUTE, AdaptiveGateway, running_adaptive_gateway


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


def understudy(
    capsys: pytest.CaptureFixture[str], gateway: AdaptiveGateway, *argv: str
) -> tuple[int, str, str]:
    code = cli.main([*argv, "--url", gateway.url, "--admin-key", ADMIN_KEY])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("understudy 0.")


def test_route_verbs(adaptive_gateway: AdaptiveGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = understudy(capsys, adaptive_gateway, "route", "pin", ROUTE, "cloud")
    assert code == 0 and out.splitlines()[0].split() == ["FIELD", "VALUE"]
    assert "pinned" in out and adaptive_gateway.chat("hello")[0] == "cloud"
    code, out, _ = understudy(capsys, adaptive_gateway, "route", "unpin", ROUTE, "--json")
    assert code == 0 and json.loads(out)["pinned"] in (None, False)

    code, out, _ = understudy(capsys, adaptive_gateway, "route", "adapters", ROUTE)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["VERSION", "ROLE", "REAL", "SYNTHETIC", "IMPORTED"]
    assert [row.split()[0] for row in rows] == ["v2", "v1"] and "active" in rows[1]  # newest first
    assert rows[0].split()[1:4] == ["20", "60", "0"]  # real and synthetic pairs per adapter

    code, out, _ = understudy(
        capsys, adaptive_gateway, "route", "rollback", ROUTE, "--version", "2", "--json"
    )
    assert code == 0 and json.loads(out)["active_adapter"] == 2
    code, out, _ = understudy(capsys, adaptive_gateway, "route", "rollback", ROUTE, "--json")
    assert code == 0 and json.loads(out)["active_adapter"] == 1  # the one before
    code, _, err = understudy(capsys, adaptive_gateway, "route", "rollback", ROUTE)
    assert code == 1 and "no adapter older than v1" in err

    code, out, _ = understudy(capsys, adaptive_gateway, "route", "eval", ROUTE, "--json")
    assert code == 0 and json.loads(out)["adapter_version"] == 1

    code, out, _ = understudy(capsys, adaptive_gateway, "route", "train", ROUTE, "--json")
    job_id = json.loads(out)["job_id"]
    code, out, _ = understudy(capsys, adaptive_gateway, "jobs", "show", job_id)
    assert code == 0 and job_id in out and "status" in out

    code, _, err = understudy(capsys, adaptive_gateway, "route", "pin", "nope", "local")
    assert code == 1 and "404" in err


def test_jobs_cancel(
    adaptive_gateway: AdaptiveGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = tmp_path / "slow-trainer"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    controller = adaptive_gateway.gateway.app.services.controller
    assert controller is not None
    controller.jobs.python = str(slow)
    code, out, _ = understudy(capsys, adaptive_gateway, "route", "train", ROUTE, "--json")
    job_id = json.loads(out)["job_id"]
    started = time.monotonic()
    code, out, _ = understudy(capsys, adaptive_gateway, "jobs", "cancel", job_id, "--json")
    assert code == 0, out
    job = json.loads(out)
    assert job["status"] == "error" and job["message"] == "cancelled"
    assert time.monotonic() - started < 15
    code, _, err = understudy(capsys, adaptive_gateway, "jobs", "cancel", job_id)
    assert code == 1 and "not running" in err
    code, _, err = understudy(capsys, adaptive_gateway, "jobs", "show", "ftjob-nope")
    assert code == 1 and "404" in err


def test_logs_export_and_delete(
    adaptive_gateway: AdaptiveGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for text in ("one", "two"):
        adaptive_gateway.chat(text)
    adaptive_gateway.chat("elsewhere", model="gpt-4o-mini")
    adaptive_gateway.gateway.wait_for_records(3)
    target = tmp_path / "task.jsonl"
    code, _, err = understudy(capsys, adaptive_gateway, "logs", "export", "--route", ROUTE, "-o", str(target))
    assert code == 0 and "wrote" in err
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["route"] for r in records] == [ROUTE, ROUTE]

    code, _, err = understudy(capsys, adaptive_gateway, "logs", "delete")
    assert code == 1 and "refusing" in err
    code, out, _ = understudy(capsys, adaptive_gateway, "logs", "delete", "--route", ROUTE)
    assert code == 0 and out.splitlines()[1].split() == ["records", "2"]
    code, out, _ = understudy(
        capsys, adaptive_gateway, "logs", "delete", "--before", "2999-01-01T00:00:00Z", "--json"
    )
    assert code == 0 and json.loads(out)["deleted"] == 1
