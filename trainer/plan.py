"""How long a job trains, decided before it starts: a budget in examples seen (a smaller one
when it continues from a previous adapter), capped in epochs; early stopping on a flat
validation loss may end it sooner (see trainer/callbacks.py).

The budget replaces a fixed epochs-per-sample-count rule: that rule gave 10 epochs (200 steps)
to a first job on 100 pairs and 10 epochs over every logged pair to a retrain, so each retrain
took longer than the last while traffic kept arriving."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.spec import TrainSpec

EVALS_PER_JOB = 12  # validation evals in a job when `eval_steps` is not set


@dataclass(frozen=True)
class StepPlan:
    """The most steps a job runs and which limit set that number (its stop reason when
    nothing ends it earlier): "budget", "max_epochs", "epochs" or "max_steps"."""

    max_steps: int
    steps_per_epoch: int
    limit: str
    detail: str
    eval_steps: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.max_steps / self.steps_per_epoch)


def examples_per_step(spec: TrainSpec) -> int:
    return spec.batch_size * spec.grad_accum


def steps_per_epoch(spec: TrainSpec, train_count: int) -> int:
    return max(1, math.ceil(math.ceil(max(train_count, 1) / spec.batch_size) / spec.grad_accum))


def budget_examples(spec: TrainSpec) -> int | None:
    """Examples a job may see; None when `epochs` or `max_steps` fixes its length instead."""
    if spec.epochs is not None or spec.max_steps is not None:
        return None
    return spec.retrain_examples_seen if spec.init_adapter is not None else spec.max_examples_seen


def sample_cap(spec: TrainSpec) -> int:
    """Training pairs a job picks at most: `max_samples`, and no more than its budget lets it
    see once (a pair picked but never seen would only be noise in the counts)."""
    budget = budget_examples(spec)
    return spec.max_samples if budget is None else max(1, min(spec.max_samples, budget))


def plan_steps(spec: TrainSpec, train_count: int) -> StepPlan:
    """The job's step plan; `max_steps` wins over `epochs`, which wins over the budget (as in
    transformers, where max_steps overrides num_train_epochs)."""
    per_epoch = steps_per_epoch(spec, train_count)
    budget = budget_examples(spec)
    if spec.max_steps is not None:
        steps, limit, detail = spec.max_steps, "max_steps", f"{spec.max_steps} steps"
    elif budget is None:
        epochs = spec.epochs or 1
        steps, limit, detail = epochs * per_epoch, "epochs", f"{epochs} epochs"
    else:
        budget_steps = max(1, math.ceil(budget / examples_per_step(spec)))
        epoch_steps = spec.max_epochs * per_epoch
        if budget_steps <= epoch_steps:
            steps, limit, detail = budget_steps, "budget", f"{budget} examples seen"
        else:
            steps, limit, detail = epoch_steps, "max_epochs", f"{spec.max_epochs} epochs"
    eval_steps = spec.eval_steps or max(1, math.ceil(steps / EVALS_PER_JOB))
    return StepPlan(steps, per_epoch, limit, detail, eval_steps)


def stop_reason(plan: StepPlan, stopped_early: bool, spec: TrainSpec) -> str:
    """Why a finished job stopped, e.g. "early_stopping: validation loss flat for 3 evals"."""
    if stopped_early:
        return (
            f"early_stopping: validation loss flat for {spec.early_stopping_patience} evals"
            f" (min delta {spec.early_stopping_min_delta})"
        )
    return f"{plan.limit}: {plan.detail}"
