"""TrainSpec, the epoch rule, names, and the CLI's mapping of flags onto the spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.cli import build_parser, main, spec_from_args
from trainer.errors import InvalidName
from trainer.names import new_job_id, validate_job_id, validate_route
from trainer.spec import TrainSpec, epochs_for


@pytest.mark.parametrize(
    ("count", "epochs"),
    [(0, 10), (1, 10), (999, 10), (1000, 10), (1500, 7), (4000, 2), (9999, 1), (10**6, 1)],
)
def test_epochs_follow_openpipes_rule(count: int, epochs: int) -> None:
    assert epochs_for(count) == epochs


def test_spec_round_trips_through_cli_flags() -> None:
    spec = TrainSpec(
        data=Path("/tmp/d.jsonl"),
        base_model="/models/tiny",
        init_adapter=Path("/a/v1"),
        lora_r=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        epochs=3,
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
