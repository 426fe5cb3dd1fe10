"""A retrain on ten times the data: no more steps than the first job, from its adapter, on its
failed pairs, new pairs and a replay of old ones; the held-out split stays the judge's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.trainer.samples import word_chat, write_jsonl
from trainer.adapters import AdapterRegistry
from trainer.dataset import heldout_bucket, prompt_key
from trainer.runner import JobContext, run_job
from trainer.spec import TrainSpec

MakeSpec = Callable[..., TrainSpec]


def run(data_dir: Path, spec: TrainSpec, job_id: str) -> dict[str, Any]:
    run_job(JobContext("words", data_dir, job_id, data_dir / f"{job_id}.json"), spec)
    version = AdapterRegistry(data_dir).latest("words")
    assert version is not None
    return version.meta


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_retrain_on_ten_times_the_data_takes_no_more_steps(
    tmp_path: Path, data_dir: Path, tiny_spec: MakeSpec
) -> None:
    chats = [word_chat(f"w{i}") for i in range(1000)]
    first_data = write_jsonl(tmp_path / "first.jsonl", chats[:100])
    all_data = write_jsonl(tmp_path / "all.jsonl", chats)
    trainable = [c for c in chats[100:] if heldout_bucket(c) >= 0.2]
    judged = next(c for c in chats[100:] if heldout_bucket(c) < 0.2)
    failed = write_jsonl(tmp_path / "failed.jsonl", [trainable[0], judged])
    # Early stopping off: the bound on steps must hold by construction, not by luck.
    rule = {"epochs": None, "early_stopping_patience": 0, "threads": 1}
    first = run(data_dir, tiny_spec(data=first_data, **rule), "ftjob-1")
    v1 = AdapterRegistry(data_dir).path("words", 1)
    second = run(data_dir, tiny_spec(data=all_data, init_adapter=v1, failed_data=failed, **rule), "ftjob-2")

    assert first["sample_count"] == 100 and second["sample_count"] == 1000
    assert second["steps_run"] <= first["steps_run"], (first["stop_reason"], second["stop_reason"])
    assert second["stop_reason"].startswith("budget") and second["train_count"] <= 200
    assert second["init_adapter"] == str(v1)
    # Continued, not started afresh: it starts nearer where the first job ended than where it began.
    start, end = first["loss_curve"][0]["loss"], first["loss_curve"][-1]["loss"]
    assert second["loss_curve"][0]["loss"] < (start + end) / 2, (start, end, second["loss_curve"][0])
    selection = second["selection"]
    assert selection["failed"] == 1 and selection["new"] > 0 and selection["replay"] > 0
    v2 = AdapterRegistry(data_dir).path("words", 2)
    trained = {prompt_key(s) for s in lines(v2 / "train.jsonl")}
    assert prompt_key(trainable[0]) in trained and prompt_key(judged) not in trained
    heldout = {prompt_key(s) for s in lines(v2 / "heldout.jsonl")}
    assert not trained & heldout and prompt_key(judged) in heldout
