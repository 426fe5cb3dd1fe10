"""The gateway's own cloud calls (judge gradings, spot checks): logged by kind, rate limited."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.demo.fakecloud import FakeCloudServer
from gateway.errors import RateLimited, UpstreamUnreachable
from gateway.services import Services
from gateway.settings import load_settings
from gateway.store.base import RecordFilter


async def test_own_calls_are_logged_as_their_kind_and_obey_route_limits(
    tmp_path: Path, data_dir: Path, fake_cloud: FakeCloudServer
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    settings = load_settings(
        config,
        environ={},
        data_dir=data_dir,
        upstream={"base_url": fake_cloud.base_url, "retry": {"attempts": 1}},
        local={"enabled": False},
        routes=[
            {"name": "graded", "match": ["m"], "limits": {"rpm": 60, "burst_s": 2}},
            {"name": "free", "match": ["f"]},
        ],
    )
    services = Services(settings)
    await services.start()
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "grade this"}]}
        answer = await services.call_cloud("graded", body, "shadow")
        assert answer["choices"][0]["message"]["content"] == "echo: grade this"
        with pytest.raises(RateLimited):  # 60 rpm with a 2 s burst: refused within a few calls
            for _ in range(5):
                await services.call_cloud("graded", body, "judge")
        with pytest.raises(UpstreamUnreachable):
            await services.call_cloud("free", {**body, "model": "garbage"}, "judge")
    finally:
        await services.stop()
    services.store.open()
    records = services.store.list_records(RecordFilter(), 20)
    assert {r["kind"] for r in records} == {"judge", "shadow"}
    assert any(r["status"] == 429 and r["kind"] == "judge" for r in records)
    assert any(r["route"] == "free" and r["outcome"] == "error" for r in records)
    assert services.store.count_records(RecordFilter(kind="user")) == 0
