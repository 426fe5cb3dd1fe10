"""The per-route state machine's rules, as pure functions over a persisted `RouteState`.

    cloud ──(min_samples new pairs, cooldown over)──▶ training
    training ──(adapter written)──▶ eval          training ──(job error)──▶ cloud (+back-off)
    eval ──(≥ promote_after verdicts AND 95% Wilson lower bound ≥ min_pass_rate)──▶ local
    eval ──(95% Wilson upper bound < min_pass_rate)──▶ cloud (collect more, retrain)
    eval ──(eval_timeout_s passed, or max_judge_errors errors in a row)──▶ cloud
    local ──(spot checks: 95% upper bound < min_pass_rate, rolling score < its bar,
             or demote_after fails in a row)──▶ cloud

Promotion is a sequential test over the eval window: a good adapter is not thrown away for
one unlucky verdict, and a mediocre one cannot pass on a lucky streak. A judge error (the
grader or the local backend could not produce a verdict) is not a verdict, but eval cannot
wait on them forever: the deadline and the error cap end it, with the reason in the history.
Nothing here does I/O: the controller feeds results in and persists what comes out.
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


# Fewer verdicts than this never reject a candidate: with one verdict, the 95% upper bound
# of a single fail (0.79) is already below a 0.8 bar, which would discard a good adapter
# one time in twenty.
MIN_VERDICTS_TO_REJECT = 5


def wilson_interval(passes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) for a pass rate: how good the rate is at
    least and at most, given how few results back it. (0, 1) when there are none."""
    if total == 0:
        return 0.0, 1.0
    p = passes / total
    denominator = 1 + z * z / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (centre - margin) / denominator, (centre + margin) / denominator


def wilson_lower_bound(passes: int, total: int, z: float = 1.96) -> float:
    return wilson_interval(passes, total, z)[0]


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
    # When the current eval began (its deadline counts from here) and the judge errors since
    # the last verdict.
    eval_started_at: float = 0.0
    judge_errors: int = 0
    # Failed spot checks since the last pass (mode local).
    fails_in_a_row: int = 0
    # The last candidate that eval turned down: the next job starts from it and from what it
    # got wrong (cleared once a candidate is promoted).
    rejected_version: int | None = None
    # Candidates turned down since the last promotion, and when the latest was: the next job
    # waits policy.retry_after_reject_s, doubled for each further rejection (capped at
    # cooldown_s), so a near miss is retried in minutes and a hopeless route does not spin.
    rejections_in_a_row: int = 0
    rejected_at: float = 0.0
    # USD spent on synthetic data for this route, ever (its cap is policy.synthetic.max_cost_usd).
    synthetic_spent_usd: float = 0.0
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


def note(state: RouteState, reason: str, to: Mode | None = None, now: float | None = None) -> None:
    """Append an entry to the route's history (capped, newest last)."""
    entry = {"ts": now or time.time(), "from": state.mode, "to": to or state.mode, "reason": reason}
    state.history.append(entry)
    del state.history[:-_HISTORY_LIMIT]


def transition(state: RouteState, to: Mode, reason: str, now: float | None = None) -> None:
    """Move `state` to mode `to`, recording why."""
    if state.mode == to:
        return
    note(state, reason, to, now)
    state.mode = to
    state.streak = 0
    state.judge_errors = 0
    state.fails_in_a_row = 0


def synthetic_added(state: RouteState, added: int, spent_usd: float, why: str, now: float) -> None:
    state.synthetic_spent_usd += spent_usd
    note(state, f"synthetic data: {added} new pairs for ${spent_usd:.4f} ({why})", now=now)


def next_training_at(state: RouteState, policy: PolicySettings) -> float:
    """The earliest time the next job may start: cooldown_s after the last one, but after
    rejected candidates retry_after_reject_s after the rejection, doubled per rejection in
    a row and never more than cooldown_s; and never before a failed job's back-off ends."""
    if state.rejections_in_a_row:
        wait = policy.retry_after_reject_s * 2 ** (state.rejections_in_a_row - 1)
        earliest = state.rejected_at + min(policy.cooldown_s, wait)
    else:
        earliest = state.last_train_at + policy.cooldown_s
    return max(earliest, state.backoff_until)


def ready_to_train(state: RouteState, policy: PolicySettings, new_pairs: int, now: float) -> bool:
    return (
        state.mode == "cloud"
        and state.pinned != "local"
        and state.job_id is None
        and new_pairs >= policy.min_samples
        and now >= next_training_at(state, policy)
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
    state.eval_started_at = now
    transition(state, "eval", f"adapter v{version} trained; evaluating", now)


def record_eval(state: RouteState, policy: PolicySettings, outcome: EvalOutcome, now: float) -> None:
    """Apply one judged answer of the candidate (mode eval): promote once enough verdicts
    show it good at the 95% level, reject once they show it cannot be."""
    if state.mode != "eval":
        return
    state.judge_errors = 0
    state.window.append((outcome.passed, outcome.score))
    state.streak = state.streak + 1 if outcome.passed else 0
    total = len(state.window)
    passes = sum(1 for passed, _ in state.window if passed)
    lower, upper = wilson_interval(passes, total)
    bar = policy.min_pass_rate
    if total >= policy.promote_after and lower >= bar:
        state.active_version = state.candidate_version
        state.candidate_version = state.rejected_version = None
        state.rejections_in_a_row = 0
        reason = f"eval passed: {passes}/{total}, pass-rate lower bound {lower:.2f} ≥ {bar:.2f}"
        transition(state, "local", reason, now)
    elif total >= MIN_VERDICTS_TO_REJECT and upper < bar:
        _reject(state, now)
        reason = f"eval failed: {passes}/{total} passed, pass-rate upper bound {upper:.2f} < {bar:.2f}; collecting more data"
        transition(state, "cloud", reason, now)


def _reject(state: RouteState, now: float) -> None:
    """The candidate under eval is turned down: the next job starts from it."""
    state.rejected_version, state.candidate_version = state.candidate_version, None
    state.rejections_in_a_row += 1
    state.rejected_at = now


def record_judge_error(state: RouteState, policy: PolicySettings, error: str, now: float) -> None:
    """A candidate's answer could not be judged. Too many in a row end the eval: a local
    backend that cannot generate, or a grader that never parses, must not stall the route."""
    if state.mode != "eval":
        return
    state.judge_errors += 1
    if state.judge_errors >= policy.max_judge_errors:
        _reject(state, now)
        reason = (
            f"eval stalled: {state.judge_errors} answers in a row could not be judged (last: {error[:200]})"
        )
        transition(state, "cloud", reason, now)


def eval_expired(state: RouteState, policy: PolicySettings, version: int, now: float) -> None:
    """The eval of `version` ran past its deadline without a decision: back to the cloud."""
    if state.mode != "eval" or state.candidate_version != version:
        return
    if now < state.eval_started_at + policy.eval_timeout_s:
        return
    total = len(state.window)
    passes = sum(1 for passed, _ in state.window if passed)
    _reject(state, now)
    reason = f"eval timed out after {policy.eval_timeout_s:.0f} s undecided ({passes}/{total} passed)"
    transition(state, "cloud", reason, now)


def record_spot_check(state: RouteState, policy: PolicySettings, outcome: EvalOutcome, now: float) -> None:
    """Apply one judged spot check of the serving adapter (mode local). The window goes on
    from the eval that promoted it, and the test mirrors promotion's: the route returns to
    the cloud when the pass rate's 95% upper bound falls below `min_pass_rate`, when the
    rolling score falls below its bar, or on `demote_after` failed checks in a row (a sudden
    break). An adapter promoted at 90% right is not sent back for the few misses a 90%
    adapter makes, which counting fails anywhere in the window would do."""
    if state.mode != "local":
        return
    state.window.append((outcome.passed, outcome.score))
    state.fails_in_a_row = 0 if outcome.passed else state.fails_in_a_row + 1
    total = len(state.window)
    passes = sum(1 for passed, _ in state.window if passed)
    upper = wilson_interval(passes, total)[1]
    rolling = state.rolling_score or 0.0
    bar = policy.threshold if policy.min_rolling_score is None else policy.min_rolling_score
    if rolling < bar:
        transition(state, "cloud", f"rolling score {rolling:.1f} fell below {bar:.0f}", now)
    elif state.fails_in_a_row >= policy.demote_after:
        transition(state, "cloud", f"{state.fails_in_a_row} failed spot checks in a row", now)
    elif total >= MIN_VERDICTS_TO_REJECT and upper < policy.min_pass_rate:
        reason = f"spot checks: {passes}/{total} passed, upper bound {upper:.2f} < {policy.min_pass_rate:.2f}"
        transition(state, "cloud", reason, now)


# --- what operators see ------------------------------------------------------------------


def view(state: RouteState, policy: PolicySettings) -> dict[str, Any]:
    """The route's state as the admin API and the dashboard show it."""
    deadline = state.eval_started_at + policy.eval_timeout_s if state.mode == "eval" else None
    return {
        "mode": state.mode,
        "serving": state.serving_mode,
        "pinned": state.pinned,
        "active_adapter": state.active_version,
        "candidate_adapter": state.candidate_version,
        "rolling_score": state.rolling_score,
        "pass_rate": state.pass_rate,
        "window": len(state.window),
        "job_id": state.job_id,
        "failed_trainings": state.failed_trainings,
        "rejections_in_a_row": state.rejections_in_a_row,
        "next_training_at": next_training_at(state, policy) if state.mode == "cloud" else None,
        "held_back": stuck(state.route, state, policy, time.time()),
        "eval_deadline": deadline,
        "history": state.history[-50:],
    }


def blocked_reason(state: RouteState) -> str | None:
    """The metric label for a route held back after failures (None when it is not): jobs
    that failed, or candidates that eval turned down."""
    if state.mode != "cloud" or state.pinned == "cloud":
        return None
    if state.failed_trainings:
        return "training_failed"
    if state.rejections_in_a_row:
        return "rejected"
    return None


def stuck(name: str, state: RouteState, policy: PolicySettings, now: float) -> str | None:
    """Why the route is not learning right now, when it is held back after failures."""
    why = blocked_reason(state)
    if why is None:
        return None
    wait = max(0.0, next_training_at(state, policy) - now)
    last = state.history[-1]["reason"] if state.history else why
    if why == "training_failed":
        count = f"failed {state.failed_trainings}x"
    else:
        count = f"{state.rejections_in_a_row} candidate(s) rejected in a row"
    return f"route {name}: {last} ({count}; next training in {wait:.0f} s at the earliest)"


def summary(state: RouteState) -> dict[str, Any]:
    return {
        "mode": state.mode,
        "serving": state.serving_mode,
        "last_change": state.history[-1] if state.history else None,
    }
