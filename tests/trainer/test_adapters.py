"""Adapter versions on disk, the status file, and the cross-process route lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.adapters import AdapterNotFound, AdapterRegistry
from trainer.errors import InvalidName, JobConflict
from trainer.locks import hold_route_lock, lock_holder
from trainer.progress import JobStatus, read_status, write_status


def publish(registry: AdapterRegistry, route: str, job_id: str, loss: float) -> int:
    with registry.staging(route, job_id) as stage:
        (stage / "adapter_config.json").write_text("{}")
        return registry.commit(route, stage, {"train_loss": loss}).version


def test_versions_are_numbered_listed_and_resolved(data_dir: Path) -> None:
    registry = AdapterRegistry(data_dir)
    assert registry.versions("r") == [] and registry.latest("r") is None
    assert [publish(registry, "r", f"job{i}", float(i)) for i in range(3)] == [1, 2, 3]
    versions = registry.versions("r")
    assert [v.version for v in versions] == [1, 2, 3]
    assert versions[0].meta["train_loss"] == 0.0 and versions[0].meta["version"] == 1
    assert versions[0].meta["route"] == "r" and "created_at" in versions[0].meta
    latest = registry.latest("r")
    assert latest is not None and latest.version == 3
    assert registry.path("r", 2) == data_dir / "adapters" / "r" / "v2"
    assert (registry.path("r", 2) / "adapter_config.json").is_file()
    with pytest.raises(AdapterNotFound):
        registry.get("r", 9)
    assert sorted(p.name for p in (data_dir / "adapters" / "r").iterdir()) == ["v1", "v2", "v3"]


def test_failed_training_leaves_no_version_and_no_staging(data_dir: Path) -> None:
    registry = AdapterRegistry(data_dir)
    with pytest.raises(RuntimeError), registry.staging("r", "job1") as stage:
        (stage / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert registry.versions("r") == []
    assert list((data_dir / "adapters" / "r").iterdir()) == []


def test_claimed_but_unfinished_version_is_skipped(data_dir: Path) -> None:
    registry = AdapterRegistry(data_dir)
    (data_dir / "adapters" / "r" / "v1").mkdir(parents=True)  # a crash between claim and rename
    assert registry.versions("r") == []
    assert publish(registry, "r", "job", 1.0) == 2


def test_update_meta_merges(data_dir: Path) -> None:
    registry = AdapterRegistry(data_dir)
    publish(registry, "r", "job", 1.0)
    registry.update_meta("r", 1, {"eval_scores": {"pass_rate": 0.9}})
    meta = json.loads((registry.path("r", 1) / "meta.json").read_text())
    assert meta["eval_scores"] == {"pass_rate": 0.9} and meta["train_loss"] == 1.0


def test_route_names_cannot_escape_the_data_dir(data_dir: Path) -> None:
    registry = AdapterRegistry(data_dir)
    for name in ("../x", "a/../../b", ".."):
        with pytest.raises(InvalidName):
            registry.versions(name)


def test_status_file_round_trip_in_design_shape(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "j.json"
    assert read_status(path) is None
    write_status(path, JobStatus(status="training", current_step=3, total_steps=10, loss=1.5, job_id="j"))
    payload = json.loads(path.read_text())
    assert list(payload)[:8] == [
        "status", "message", "current_step", "total_steps", "current_epoch", "total_epochs", "loss", "adapter_path",
    ]  # fmt: skip
    status = read_status(path)
    assert status is not None and status.current_step == 3 and not status.terminal
    assert [p.name for p in path.parent.iterdir()] == ["j.json"]  # no temp files left behind


def test_route_lock_is_exclusive_and_names_its_holder(data_dir: Path) -> None:
    assert lock_holder(data_dir, "r") is None
    with hold_route_lock(data_dir, "r", "job-a"):
        assert lock_holder(data_dir, "r") == "job-a"
        with pytest.raises(JobConflict) as conflict, hold_route_lock(data_dir, "r", "job-b"):
            pass
        assert conflict.value.job_id == "job-a"
        with hold_route_lock(data_dir, "other", "job-c"):
            assert lock_holder(data_dir, "other") == "job-c"
    assert lock_holder(data_dir, "r") is None
