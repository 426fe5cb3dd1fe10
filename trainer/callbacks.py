"""Trainer callbacks: progress (with the loss curve and an ETA) to the job's status, and early
stopping that remembers that it fired."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

Report = Callable[..., object]
MAX_CURVE_POINTS = 200
LOSS_KEYS = {"loss": "loss", "eval_loss": "validation_loss"}  # Trainer log key → curve key


class LossCurve:
    """Training and validation loss per logged step."""

    def __init__(self) -> None:
        self.points: dict[int, dict[str, float]] = {}

    def add(self, step: int, logs: dict[str, float]) -> dict[str, float]:
        """Record the losses in one Trainer log event; return them under their curve keys."""
        found = {name: round(float(logs[key]), 5) for key, name in LOSS_KEYS.items() if key in logs}
        if found:
            self.points.setdefault(step, {"step": step}).update(found)
        return found

    def thinned(self, keep: int = MAX_CURVE_POINTS) -> list[dict[str, float]]:
        """About `keep` points, evenly strided; validation points and the last one always kept."""
        points = [self.points[step] for step in sorted(self.points)]
        stride = max(1, -(-len(points) // keep))
        last = len(points) - 1
        return [p for i, p in enumerate(points) if i % stride == 0 or i == last or "validation_loss" in p]

    def train_losses(self) -> list[dict[str, float]]:
        return [{"step": p["step"], "loss": p["loss"]} for p in self.thinned() if "loss" in p]


def eta_seconds(started: float | None, step: int, total: int) -> float | None:
    """Seconds left at the pace so far; None before the first step."""
    if started is None or step <= 0 or total <= 0:
        return None
    elapsed = time.monotonic() - started
    return round(max(0, total - step) * elapsed / step, 1)


class ProgressCallback(TrainerCallback):
    """Forwards step, epoch, losses, the curve and an ETA to the job's status on every log."""

    def __init__(self, report: Report, total_epochs: int) -> None:
        self.report = report
        self.total_epochs = total_epochs
        self.curve = LossCurve()
        self.started: float | None = None
        self.ended = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        self.report(message="training", total_steps=state.max_steps, total_epochs=self.total_epochs)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        found = self.curve.add(state.global_step, logs or {})
        changes: dict[str, Any] = {
            "current_step": state.global_step,
            "current_epoch": round(state.epoch or 0.0, 3),
            "eta_seconds": 0.0
            if self.ended
            else eta_seconds(self.started, state.global_step, state.max_steps),
            **found,
        }
        if found:
            changes["loss_curve"] = self.curve.thinned()
        self.report(**changes)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ended = True  # from here on (held-out loss, saving) no ETA is meaningful
        self.report(eta_seconds=0.0)


class FlatLossStop(EarlyStoppingCallback):
    """transformers' early stopping on `eval_loss` (the validation slice), which also records
    the step at which it stopped training."""

    def __init__(self, patience: int, min_delta: float) -> None:
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=min_delta)
        self.stopped_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The parent warns that the best model is not reloaded: on purpose, a flat loss means
        # the last weights are as good (and the judge, not this loss, decides promotion).
        return None

    # The parent's own signature adds `metrics` to TrainerCallback's, hence the ignore.
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().on_evaluate(args, state, control, metrics, **kwargs)
        # Not `control.should_training_stop`: the Trainer sets that itself at its last step.
        if self.early_stopping_patience_counter >= self.early_stopping_patience and self.stopped_at is None:
            self.stopped_at = state.global_step
