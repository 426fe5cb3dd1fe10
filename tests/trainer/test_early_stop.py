"""Training ends when the validation loss is flat, within the budget otherwise, and says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.trainer.samples import word_chat, write_jsonl
from trainer.adapters import AdapterRegistry
from trainer.runner import JobContext, run_job
from trainer.spec import TrainSpec

MakeSpec = Callable[..., TrainSpec]


def train(data_dir: Path, spec: TrainSpec) -> dict[str, Any]:
    """Run one job in this process; return (final status, meta.json of the new version)."""
    status = run_job(JobContext("words", data_dir, "ftjob-test", data_dir / "status.json"), spec)
    version = AdapterRegistry(data_dir).latest("words")
    assert version is not None
    return {"status": status.model_dump(), "meta": version.meta}


def test_flat_validation_loss_stops_the_job_and_the_reason_says_so(
    tmp_path: Path, data_dir: Path, tiny_spec: MakeSpec
) -> None:
    # A learning rate this small leaves every weight as it was: the validation loss is flat
    # from the first eval on, so the third eval without improvement ends the job.
    data = write_jsonl(tmp_path / "words.jsonl", [word_chat(f"w{i}") for i in range(60)])
    spec = tiny_spec(
        data=data, epochs=None, learning_rate=1e-12, eval_steps=1, early_stopping_patience=3, threads=1
    )
    job = train(data_dir, spec)
    meta, status = job["meta"], job["status"]

    assert meta["stop_reason"] == "early_stopping: validation loss flat for 3 evals (min delta 0.01)"
    assert meta["steps_run"] == 4 < meta["planned_steps"]
    validation = [p["validation_loss"] for p in meta["loss_curve"] if "validation_loss" in p]
    assert len(validation) == 4 and max(validation) - min(validation) < 0.01
    assert [p["step"] for p in meta["loss_curve"]] == [1, 2, 3, 4]
    assert status["stop_reason"] == meta["stop_reason"]
    assert status["current_step"] == 4 and status["eta_seconds"] == 0.0
    assert status["validation_loss"] == validation[-1]


def test_a_falling_loss_runs_to_the_epoch_cap(tmp_path: Path, data_dir: Path, tiny_spec: MakeSpec) -> None:
    data = write_jsonl(tmp_path / "words.jsonl", [word_chat(f"w{i}") for i in range(20)])
    spec = tiny_spec(data=data, epochs=None, max_epochs=2, early_stopping_patience=0, threads=1)
    meta = train(data_dir, spec)["meta"]

    train_count = meta["train_count"]
    assert meta["stop_reason"] == "max_epochs: 2 epochs"
    assert meta["steps_run"] == meta["planned_steps"] == 2 * -(-train_count // spec.batch_size)
    assert meta["validation_count"] >= 1 and meta["validation_loss"] is not None
    losses = [p["loss"] for p in meta["loss_curve"] if "loss" in p]
    assert len(losses) == meta["steps_run"] and losses[-1] < losses[0]
    assert meta["loss_history"] == [{"step": p["step"], "loss": p["loss"]} for p in meta["loss_curve"]]
