"""Training jobs as real subprocesses on the tiny random Llama: progress, adapter, cancel,
crash, recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.samples import word_chat, write_jsonl
from trainer.adapters import AdapterRegistry
from trainer.errors import JobConflict
from trainer.jobs import JobManager, pid_alive
from trainer.locks import hold_route_lock, lock_holder
from trainer.progress import JobStatus, write_status
from trainer.spec import TrainSpec

JOB_TIMEOUT_S = 240
MakeSpec = Callable[..., TrainSpec]


@pytest.fixture
def finished() -> list[dict[str, Any]]:
    """Final statuses reported through JobManager's on_finish hook."""
    return []


@pytest.fixture
async def manager(data_dir: Path, finished: list[dict[str, Any]]) -> AsyncIterator[JobManager]:
    jobs = JobManager(data_dir, stop_grace_s=10, on_finish=finished.append)
    yield jobs
    await jobs.aclose()


@pytest.fixture
def long_spec(tiny_spec: MakeSpec, tmp_path: Path) -> TrainSpec:
    """Hundreds of steps: still running when the test interferes."""
    data = write_jsonl(tmp_path / "many.jsonl", [word_chat(f"w{i}") for i in range(200)])
    return tiny_spec(data=data, epochs=10, batch_size=2)


async def watch(manager: JobManager, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the status file until the job is over; return the final status and all seen."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(JOB_TIMEOUT_S):
        waiter = asyncio.create_task(manager.wait(job_id))
        while not waiter.done():
            status = manager.status(job_id)
            if status is not None and (not seen or status != seen[-1]):
                seen.append(status)
            await asyncio.sleep(0.02)
    final = waiter.result()
    assert final is not None
    return final, seen


async def until_training(manager: JobManager, job_id: str) -> dict[str, Any]:
    async with asyncio.timeout(JOB_TIMEOUT_S):
        while True:
            status = manager.status(job_id)
            assert status is not None and status["status"] != "error", status
            if status["current_step"] >= 1:
                return status
            await asyncio.sleep(0.05)


async def test_job_trains_end_to_end_as_a_subprocess(
    manager: JobManager,
    finished: list[dict[str, Any]],
    tiny_spec: MakeSpec,
    tiny_model_dir: Path,
    data_dir: Path,
) -> None:
    job_id = await manager.start("words", tiny_spec(epochs=6, early_stopping_patience=0))
    assert manager.status(job_id)["status"] == "queued"  # type: ignore[index]
    assert manager.running_job("words") == job_id
    final, seen = await watch(manager, job_id)

    assert final["status"] == "completed", final
    assert final["adapter_path"] == str(data_dir / "adapters" / "words" / "v1")
    assert final["current_step"] == final["total_steps"] > 0
    assert final["current_epoch"] == final["total_epochs"] == 6
    assert final["loss"] is not None and final["eval_loss"] is not None
    assert any(s["status"] == "training" for s in seen)
    steps = [s["current_step"] for s in seen]
    assert steps == sorted(steps)
    assert all(s["current_step"] <= s["total_steps"] for s in seen if s["total_steps"])
    assert manager.running_job("words") is None and lock_holder(data_dir, "words") is None
    assert [job["status"] for job in finished] == ["completed"]
    assert manager.log_path(job_id).is_file()

    version = AdapterRegistry(data_dir).latest("words")
    assert version is not None and version.version == 1
    meta = version.meta
    assert meta["sample_count"] == 20
    assert meta["train_count"] + meta["validation_count"] + meta["heldout_count"] == 20
    assert meta["heldout_count"] >= 1 and meta["hyperparameters"]["epochs"] == 6
    assert meta["validation_count"] >= 1 and meta["stop_reason"] == "epochs: 6 epochs"
    assert meta["steps_run"] == meta["planned_steps"] == final["total_steps"]
    assert any("validation_loss" in point for point in meta["loss_curve"])
    assert final["loss_curve"] and final["stop_reason"] == meta["stop_reason"]
    assert len(version.heldout_path.read_text().splitlines()) == meta["heldout_count"]
    losses = [point["loss"] for point in meta["loss_history"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert_adapter_loads(tiny_model_dir, version.path)


def assert_adapter_loads(base_dir: Path, adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    trained_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained_b and any(p.abs().sum() > 0 for p in trained_b)  # B starts at zero
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == base.config.vocab_size


async def test_one_job_per_route_and_cancel_ends_as_error(
    manager: JobManager, long_spec: TrainSpec, data_dir: Path
) -> None:
    job_id = await manager.start("words", long_spec)
    with pytest.raises(JobConflict):
        await manager.start("words", long_spec)
    await until_training(manager, job_id)
    assert lock_holder(data_dir, "words") == job_id
    assert await manager.cancel(job_id) is True
    final = manager.status(job_id)
    assert final is not None and final["status"] == "error" and final["message"] == "cancelled"
    assert final["finished_at"] is not None
    assert manager.running_job("words") is None
    assert list((data_dir / "adapters" / "words").iterdir()) == []  # staging removed, no version
    assert await manager.cancel(job_id) is False


async def test_killed_job_ends_as_error_naming_the_signal(
    manager: JobManager, long_spec: TrainSpec, data_dir: Path
) -> None:
    job_id = await manager.start("words", long_spec)
    status = await until_training(manager, job_id)
    os.kill(status["pid"], signal.SIGKILL)
    final, _ = await watch(manager, job_id)
    assert final["status"] == "error"
    assert "killed by SIGKILL" in final["message"]
    assert not (data_dir / "adapters" / "words" / f".staging-{job_id}").exists()
    assert manager.running_job("words") is None


async def test_bad_base_model_ends_as_error_with_the_reason(manager: JobManager, tiny_spec: MakeSpec) -> None:
    job_id = await manager.start("words", tiny_spec(base_model="/nonexistent/model"))
    final, _ = await watch(manager, job_id)
    assert final["status"] == "error"
    assert "cannot load base model '/nonexistent/model'" in final["message"]


async def test_job_started_elsewhere_blocks_the_route(manager: JobManager, data_dir: Path) -> None:
    with hold_route_lock(data_dir, "words", "ftjob-by-hand"):
        assert manager.running_job("words") == "ftjob-by-hand"
        with pytest.raises(JobConflict):
            await manager.start("words")
    assert manager.running_job("words") is None


async def sleeper(job_id: str) -> asyncio.subprocess.Process:
    """A stand-in for a trainer left running by a previous gateway (its argv names the job)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", "--job-id", job_id, start_new_session=True
    )
    async with asyncio.timeout(10):
        # Until exec has replaced the fork, the child's command line is still pytest's.
        while not pid_alive(process.pid, job_id):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return process


def write_job(data_dir: Path, job_id: str, status: str, pid: int | None) -> None:
    path = data_dir / "jobs" / f"{job_id}.json"
    write_status(path, JobStatus(status=status, job_id=job_id, route="words", pid=pid))  # type: ignore[arg-type]


async def test_recover_marks_jobs_whose_process_is_gone(manager: JobManager, data_dir: Path) -> None:
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    live = await sleeper("ftjob-live")
    try:
        write_job(data_dir, "ftjob-dead", "training", dead.pid)
        write_job(data_dir, "ftjob-nopid", "queued", None)
        write_job(data_dir, "ftjob-reused", "training", os.getpid())  # a pid now owned by another program
        write_job(data_dir, "ftjob-live", "training", live.pid)
        write_job(data_dir, "ftjob-done", "completed", None)
        assert sorted(manager.recover()) == ["ftjob-dead", "ftjob-nopid", "ftjob-reused"]
        for job_id in ("ftjob-dead", "ftjob-nopid", "ftjob-reused"):
            status = manager.status(job_id)
            assert status is not None and status["status"] == "error" and "gone" in status["message"]
        assert manager.status("ftjob-live")["status"] == "training"  # type: ignore[index]
        assert manager.status("ftjob-done")["status"] == "completed"  # type: ignore[index]
        assert manager.recover() == []

        assert await manager.cancel("ftjob-live") is True
        assert await live.wait() == -signal.SIGTERM
        assert manager.status("ftjob-live")["message"] == "cancelled"  # type: ignore[index]
    finally:
        if live.returncode is None:
            live.kill()


async def test_wait_on_a_foreign_job_settles_it_when_it_dies(manager: JobManager, data_dir: Path) -> None:
    live = await sleeper("ftjob-orphan")
    write_job(data_dir, "ftjob-orphan", "training", live.pid)
    waiter = asyncio.create_task(manager.wait("ftjob-orphan"))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    live.kill()
    await live.wait()
    async with asyncio.timeout(10):
        final = await waiter
    assert final is not None and final["status"] == "error"


def test_status_of_unknown_or_unsafe_ids_is_none(data_dir: Path) -> None:
    jobs = JobManager(data_dir)
    assert jobs.status("ftjob-missing") is None
    assert jobs.status("../../etc/passwd") is None


def test_continuing_from_a_previous_adapter(tiny_spec: MakeSpec, data_dir: Path) -> None:
    from trainer.cli import main

    first = tiny_spec(lora_r=4, lora_alpha=8, epochs=1)
    assert main(["--route", "words", "--data-dir", str(data_dir), *first.to_argv()]) == 0
    v1 = AdapterRegistry(data_dir).path("words", 1)
    second = tiny_spec(init_adapter=v1, epochs=1)
    assert main(["--route", "words", "--data-dir", str(data_dir), *second.to_argv()]) == 0
    meta = json.loads((data_dir / "adapters" / "words" / "v2" / "meta.json").read_text())
    assert meta["init_adapter"] == str(v1)
    assert meta["lora"]["r"] == 4  # the continued adapter keeps its own shape


async def test_failed_pairs_travel_to_the_job_and_are_trained_on(
    manager: JobManager, tiny_spec: MakeSpec, data_dir: Path
) -> None:
    from trainer.dataset import heldout_bucket

    words = [f"failed{i}" for i in range(20)]
    word = next(w for w in words if heldout_bucket(word_chat(w)) >= 0.2)
    row = {"prompt": word_chat(word)["messages"][:-1], "cloud_answer": f"The word is {word}.", "passed": 0}
    job_id = await manager.start("words", tiny_spec(max_steps=2, threads=1), failed_pairs=[row])
    final, _ = await watch(manager, job_id)
    assert final["status"] == "completed", final
    assert json.loads(manager.failed_path(job_id).read_text()) == row
    version = AdapterRegistry(data_dir).latest("words")
    assert version is not None and version.meta["selection"]["failed"] == 1
    assert f"Say the word {word}" in (version.path / "train.jsonl").read_text()


async def test_adapters_dir_holds_the_versions(tiny_spec: MakeSpec, data_dir: Path, tmp_path: Path) -> None:
    """A shared adapters volume apart from the data dir: the job writes its version there, and
    a registry on that volume (another replica's) reads it."""
    shared = tmp_path / "volume" / "adapters"
    jobs = JobManager(data_dir, adapters_dir=shared)
    try:
        job_id = await jobs.start("words", tiny_spec(epochs=1))
        final, _ = await watch(jobs, job_id)
    finally:
        await jobs.aclose()
    assert final["status"] == "completed", final
    assert final["adapter_path"] == str(shared / "words" / "v1")
    assert not (data_dir / "adapters").exists()
    found = AdapterRegistry(tmp_path / "elsewhere", shared).latest("words")
    assert found is not None and found.version == 1 and (found.path / "adapter_config.json").is_file()
