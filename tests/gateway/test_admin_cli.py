"""`understudy routes` / `understudy status` against a running gateway."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.admin_cli import job_cell, main, run, table, traffic_cell
from gateway.demo.fakecloud import FakeCloudServer
from tests.gateway.web.admin_fixtures import ADMIN_KEY, ROUTE, AdaptiveGateway, running_adaptive_gateway


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


def _run(command: str, url: str, key: str | None = ADMIN_KEY, *extra: str) -> tuple[int, str]:
    import argparse

    args = argparse.Namespace(url=url, admin_key=key, json="--json" in extra)
    out = io.StringIO()
    return run(command, args, out), out.getvalue()


def test_routes_table(adaptive_gateway: AdaptiveGateway) -> None:
    for i in range(3):
        adaptive_gateway.chat(f"q{i}")
    adaptive_gateway.chat("to the cloud", model="gpt-4o-mini")
    adaptive_gateway.gateway.wait_for_records(4)
    code, out = _run("routes", adaptive_gateway.url)
    assert code == 0, out
    header, task, default = out.splitlines()
    assert header.split()[:3] == ["ROUTE", "MODE", "SERVING"]
    assert task.split()[:3] == [ROUTE, "local", "local"]
    assert "0% / 100% / 0% (3)" in task and "- / 70" in task and "v1" in task
    assert default.startswith("default") and "100% / 0% / 0% (1)" in default


def test_status_shows_health_totals_and_a_pin(
    adaptive_gateway: AdaptiveGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    adaptive_gateway.chat("hello")
    code, out = _run("status", adaptive_gateway.url)
    assert code == 0, out
    assert out.startswith(f"Understudy at {adaptive_gateway.url}: ready, local backend external")
    assert "served locally" in out and "saved by local answers" in out
    code, out = _run("routes", adaptive_gateway.url, ADMIN_KEY, "--json")
    assert code == 0 and json.loads(out)[0]["name"] == ROUTE
    # the console script's own parser
    assert main(["routes", "--url", adaptive_gateway.url, "--admin-key", ADMIN_KEY]) == 0
    assert ROUTE in capsys.readouterr().out


def test_refusals_and_unreachable_gateway(
    adaptive_gateway: AdaptiveGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("routes", adaptive_gateway.url, "wrong-key")[0] == 1
    assert "401" in capsys.readouterr().err
    assert _run("status", "http://127.0.0.1:9")[0] == 1
    assert "cannot reach the gateway" in capsys.readouterr().err


def test_cells() -> None:
    assert traffic_cell({"cloud": 1, "local": 3, "failover": 0}) == "25% / 75% / 0% (4)"
    assert traffic_cell({}) == "- (0 requests)"
    job = {"status": "training", "current_step": 5, "total_steps": 20, "loss": 1.23456}
    assert job_cell(job) == "training 5/20 (25%) loss 1.235"
    assert job_cell(None) == "-" and job_cell({"status": "queued"}) == "queued"
    assert table([["a", "bb"]], header=["X", "Y"]).splitlines() == ["X  Y", "a  bb"]
