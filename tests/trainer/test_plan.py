"""The step plan: a budget in examples seen, an epoch cap, a smaller budget to continue."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.plan import plan_steps, sample_cap, stop_reason
from trainer.spec import TrainSpec


@pytest.mark.parametrize(
    ("train_count", "steps", "limit"),
    [
        (72, 54, "max_epochs"),  # 100 logged pairs: 3 epochs of 18 steps (the old rule: 10 epochs)
        (240, 100, "budget"),  # 400 examples seen at batch 4
        (3, 3, "max_epochs"),
    ],
)
def test_a_first_job_trains_within_budget_and_epoch_cap(train_count: int, steps: int, limit: str) -> None:
    plan = plan_steps(TrainSpec(), train_count)
    assert (plan.max_steps, plan.limit) == (steps, limit)


def test_a_retrain_has_the_smaller_budget_whatever_the_data() -> None:
    first = plan_steps(TrainSpec(), 72)
    spec = TrainSpec(init_adapter=Path("/a/v1"))
    assert sample_cap(spec) == 200 and sample_cap(TrainSpec()) == 300
    for train_count in (200, 1000, 100_000):
        plan = plan_steps(spec, train_count)
        assert plan.max_steps == 50 <= first.max_steps and plan.limit == "budget"


def test_fixed_epochs_and_max_steps_override_the_budget() -> None:
    assert plan_steps(TrainSpec(epochs=10), 80).max_steps == 200
    plan = plan_steps(TrainSpec(epochs=10, max_steps=30), 80)
    assert (plan.max_steps, plan.limit, plan.detail) == (30, "max_steps", "30 steps")
    assert plan_steps(TrainSpec(max_steps=100_000), 3).max_steps == 100_000  # as in transformers
    assert sample_cap(TrainSpec(epochs=10)) == sample_cap(TrainSpec(max_steps=5)) == 300


def test_evals_are_spread_over_the_job() -> None:
    assert plan_steps(TrainSpec(), 72).eval_steps == 5
    assert plan_steps(TrainSpec(eval_steps=10), 72).eval_steps == 10
    assert plan_steps(TrainSpec(), 2).eval_steps == 1


def test_stop_reasons() -> None:
    spec = TrainSpec()
    plan = plan_steps(spec, 240)
    assert stop_reason(plan, False, spec) == "budget: 400 examples seen"
    assert (
        stop_reason(plan, True, spec) == "early_stopping: validation loss flat for 3 evals (min delta 0.01)"
    )
    assert stop_reason(plan_steps(spec, 72), False, spec) == "max_epochs: 3 epochs"
