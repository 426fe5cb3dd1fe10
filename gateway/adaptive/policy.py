"""The per-route state machine's rules, as pure functions over a persisted `RouteState`.

    cloud ──(min_samples new pairs, cooldown over)──▶ training
    training ──(adapter written)──▶ eval          training ──(job error)──▶ cloud (+back-off)
    eval ──(promote_after passes in a row AND Wilson lower bound ≥ min_pass_rate)──▶ local
    eval ──(one fail)──▶ cloud (collect more, retrain)
    local ──(rolling score < threshold, or demote_after fails in the window)──▶ cloud

Judge errors (a grader that could not answer) never move a route. Nothing here does I/O:
the controller feeds results in and persists what comes out.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.settings import PolicySettings

Mode = Literal["cloud", "training", "eval", "local"]
Pin = Literal["cloud", "local"]
MODES: tuple[Mode, ...] = ("cloud", "training", "eval", "local")
_HISTORY_LIMIT = 200
_MAX_BACKOFF_S = 6 * 3600.0


def wilson_lower_bound(passes: int, total: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval (95% by default) for a pass rate: how good the
    rate is at least, given how few results back it. 0 when there are none."""
    if total == 0:
        return 0.0
    p = passes / total
    denominator = 1 + z * z / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (centre - margin) / denominator


@dataclass
class EvalOutcome:
    passed: bool
    score: float  # 0-100, the mean of the judge's scores


@dataclass
class RouteState:
    route: str
    mode: Mode = "cloud"
    pinned: Pin | None = None
    # The adapter serving (local) or last known good; the candidate under eval.
    active_version: int | None = None
    candidate_version: int | None = None
    # Newest log record id the last training job saw, so "new pairs" can be counted.
    trained_through_id: int = 0
    last_train_at: float = 0.0
    failed_trainings: int = 0
    backoff_until: float = 0.0
    job_id: str | None = None
    streak: int = 0
    window: deque[tuple[bool, float]] = field(default_factory=deque)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if k not in ("window",)},
            "window": [list(item) for item in self.window],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], window_size: int) -> RouteState:
        window = deque((tuple(item) for item in data.pop("window", [])), maxlen=window_size)
        state = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        state.window = window  # type: ignore[assignment]
        return state

    @property
    def serving_mode(self) -> Mode:
        """Who answers user traffic: a pin wins over the adaptive mode."""
        if self.pinned == "cloud":
            return "cloud"
        if self.pinned == "local" and self.active_version is not None:
            return "local"
        return "local" if self.mode == "local" else "cloud"

    @property
    def rolling_score(self) -> float | None:
        if not self.window:
            return None
        return sum(score for _, score in self.window) / len(self.window)

    @property
    def pass_rate(self) -> float | None:
        if not self.window:
            return None
        return sum(1 for passed, _ in self.window if passed) / len(self.window)


def transition(state: RouteState, to: Mode, reason: str, now: float | None = None) -> None:
    """Move `state` to mode `to`, recording why (the history is capped, newest last)."""
    if state.mode == to:
        return
    state.history.append({"ts": now or time.time(), "from": state.mode, "to": to, "reason": reason})
    del state.history[:-_HISTORY_LIMIT]
    state.mode = to
    state.streak = 0


def ready_to_train(state: RouteState, policy: PolicySettings, new_pairs: int, now: float) -> bool:
    return (
        state.mode == "cloud"
        and state.pinned != "local"
        and state.job_id is None
        and new_pairs >= policy.min_samples
        and now >= state.last_train_at + policy.cooldown_s
        and now >= state.backoff_until
    )


def training_started(state: RouteState, job_id: str, through_id: int, now: float) -> None:
    state.job_id = job_id
    state.trained_through_id = through_id
    state.last_train_at = now
    transition(state, "training", f"training job {job_id} started", now)


def training_failed(state: RouteState, policy: PolicySettings, reason: str, now: float) -> None:
    state.job_id = None
    state.failed_trainings += 1
    backoff = min(_MAX_BACKOFF_S, max(60.0, policy.cooldown_s) * 2 ** (state.failed_trainings - 1))
    state.backoff_until = now + backoff
    transition(state, "cloud", f"training failed: {reason}; retry after {backoff:.0f} s", now)


def training_completed(state: RouteState, version: int, window_size: int, now: float) -> None:
    state.job_id = None
    state.failed_trainings = 0
    state.candidate_version = version
    state.window = deque(maxlen=window_size)
    transition(state, "eval", f"adapter v{version} trained; evaluating", now)


def record_eval(state: RouteState, policy: PolicySettings, outcome: EvalOutcome, now: float) -> None:
    """Apply one judged shadow answer of the candidate (mode eval)."""
    if state.mode != "eval":
        return
    state.window.append((outcome.passed, outcome.score))
    if not outcome.passed:
        state.candidate_version = None
        transition(state, "cloud", f"eval failed (score {outcome.score:.0f}); collecting more data", now)
        return
    state.streak += 1
    passes = sum(1 for passed, _ in state.window if passed)
    bound = wilson_lower_bound(passes, len(state.window))
    if state.streak >= policy.promote_after and bound >= policy.min_pass_rate:
        state.active_version = state.candidate_version
        state.candidate_version = None
        streak = state.streak
        transition(
            state,
            "local",
            f"{streak} passes in a row, pass-rate lower bound {bound:.2f} ≥ {policy.min_pass_rate:.2f}",
            now,
        )


def record_spot_check(state: RouteState, policy: PolicySettings, outcome: EvalOutcome, now: float) -> None:
    """Apply one judged spot check of the serving adapter (mode local)."""
    if state.mode != "local":
        return
    state.window.append((outcome.passed, outcome.score))
    fails = sum(1 for passed, _ in state.window if not passed)
    rolling = state.rolling_score or 0.0
    bar = policy.threshold if policy.min_rolling_score is None else policy.min_rolling_score
    if rolling < bar:
        transition(state, "cloud", f"rolling score {rolling:.1f} fell below {bar:.0f}", now)
    elif fails >= policy.demote_after:
        transition(state, "cloud", f"{fails} failed spot checks in the last {len(state.window)}", now)
