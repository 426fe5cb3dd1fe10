"""TrainSpec, its default threads, names, and the CLI's mapping of flags onto the spec."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.cli import build_parser, main, spec_from_args
from trainer.errors import InvalidName
from trainer.names import new_job_id, validate_job_id, validate_route
from trainer.spec import TrainSpec, default_threads

MakeSpec = Callable[..., TrainSpec]


@pytest.mark.parametrize(("cores", "idle", "serving"), [(1, 1, 1), (2, 2, 1), (3, 3, 1), (16, 16, 8)])
def test_a_job_uses_every_core_unless_the_local_model_serves(
    monkeypatch: pytest.MonkeyPatch, cores: int, idle: int, serving: int
) -> None:
    monkeypatch.setattr("trainer.spec.usable_cores", lambda: cores)
    assert default_threads(local_serving=False) == idle
    assert default_threads(local_serving=True) == serving


def test_the_job_runs_on_the_threads_its_spec_names(tiny_spec: MakeSpec, data_dir: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        spec = tiny_spec(max_steps=1, threads=1)
        assert main(["--route", "words", "--data-dir", str(data_dir), *spec.to_argv()]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    meta = json.loads((data_dir / "adapters" / "words" / "v1" / "meta.json").read_text())
    assert meta["threads"] == 1 and "threads" not in meta["hyperparameters"]
    (status,) = [json.loads(p.read_text()) for p in (data_dir / "jobs").glob("*.json")]
    assert status["threads"] == 1


def test_spec_round_trips_through_cli_flags() -> None:
    spec = TrainSpec(
        data=Path("/tmp/d.jsonl"),
        base_model="/models/tiny",
        init_adapter=Path("/a/v1"),
        lora_r=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        epochs=3,
        max_examples_seen=800,
        max_samples=50,
        replay_fraction=0.5,
        failed_data=Path("/tmp/failed.jsonl"),
        early_stopping_min_delta=0.001,
        early_stopping_patience=0,
        learning_rate=1e-3,
        eval_fraction=0.1,
        group_by_length=False,
        gradient_checkpointing=True,
        device="cpu",
    )
    args = build_parser().parse_args(["--route", "r", *spec.to_argv()])
    assert spec_from_args(args) == spec
    assert TrainSpec().to_argv() == []


def test_cli_aliases_and_comma_separated_modules() -> None:
    args = build_parser().parse_args(["--route", "r", "--lr", "0.001", "--target-modules", "q_proj, k_proj"])
    spec = spec_from_args(args)
    assert spec.learning_rate == 0.001
    assert spec.target_modules == ["q_proj", "k_proj"]
    assert spec.lora_r == 16 and spec.lora_alpha == 32 and spec.target_modules != "all-linear"


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 65, "a b", "ü"])
def test_unsafe_route_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_route(name)


def test_safe_names_pass() -> None:
    assert validate_route("chat-v2.1_x") == "chat-v2.1_x"
    assert validate_job_id(new_job_id()).startswith("ftjob-")
    with pytest.raises(InvalidName):
        validate_job_id("../x")


@pytest.mark.parametrize(
    "argv",
    [
        ["--route", "../x"],
        ["--route", "r", "--lora-r", "0"],
        ["--route", "r", "--job-id", "a/b"],
        ["--route", "r", "--nope"],
    ],
)
def test_cli_rejects_bad_arguments_with_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_cli_export_writes_usable_pairs(tmp_path: Path, chats_file: Path) -> None:
    out = tmp_path / "export.jsonl"
    assert (
        main(["--route", "r", "--data", str(chats_file), "--data-dir", str(tmp_path), "--export", str(out)])
        == 0
    )
    assert len(out.read_text().splitlines()) == 20
