"""What the dashboard shows, gathered in one call: per route its state, history, traffic over
time, judged scores, recent evals made readable, training progress and totals."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from prometheus_client.metrics_core import Metric

from gateway.adaptive.controller import AdaptiveController
from gateway.metrics import PREFIX
from gateway.services import Services
from gateway.settings import RouteSettings
from gateway.web.common import parse_time
from gateway.web.schemas import DashboardRoute, EvalView, RouteTotals, ScorePoint, SeriesPoint
from gateway.web.timeline import Point

SCORE_POINTS = 120
EVAL_CARDS = 8
TEXT_LIMIT = 4000
_ADAPTER_FIELDS = (
    "version",
    "created_at",
    "sample_count",
    "train_count",
    "heldout_count",
    "train_loss",
    "eval_loss",
    "total_steps",
    "loss_history",
    "loss_curve",
    "stop_reason",
    "steps_run",
    "planned_steps",
    "validation_loss",
    "trained_with_tools",
    "real_count",
    "synthetic_count",
)


def route_totals(families: Iterable[Metric]) -> dict[str, RouteTotals]:
    """Per route: requests by backend, spend, savings net of judging, and the requests the
    local model was not asked, since the process started."""
    requests: dict[str, dict[str, int]] = defaultdict(lambda: {"cloud": 0, "local": 0, "failover": 0})
    money: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    skipped: dict[str, dict[str, int]] = defaultdict(dict)
    for family in families:
        for sample in family.samples:
            route = sample.labels.get("route", "")
            if sample.name == f"{PREFIX}requests_total":
                backend = sample.labels.get("backend", "cloud")
                requests[route][backend] = requests[route].get(backend, 0) + int(sample.value)
            elif sample.name in _MONEY:
                money[route][_MONEY[sample.name]] += sample.value
            elif sample.name == f"{PREFIX}local_skipped_total":
                reason = sample.labels.get("reason", "")
                skipped[route][reason] = skipped[route].get(reason, 0) + int(sample.value)
    return {name: _totals(requests[name], money[name], skipped[name]) for name in set(requests) | set(money)}


_MONEY = {
    f"{PREFIX}cost_usd_total": "spent",
    f"{PREFIX}cost_saved_usd_total": "saved",
    f"{PREFIX}judge_cost_usd_total": "judge",
}


def _totals(requests: dict[str, int], money: dict[str, float], skipped: dict[str, int]) -> RouteTotals:
    return RouteTotals(
        requests=dict(requests),
        cost_usd=round(money["spent"], 6),
        cost_saved_usd=round(money["saved"], 6),
        judge_cost_usd=round(money["judge"], 6),
        net_saved_usd=round(money["saved"] - money["judge"], 6),
        local_skipped=skipped,
    )


def _clip(text: Any) -> str:
    value = text if isinstance(text, str) else "" if text is None else str(text)
    return value if len(value) <= TEXT_LIMIT else value[:TEXT_LIMIT] + " …"


def question_text(prompt: Any) -> str:
    """The last user message of a logged prompt (a messages list), as text."""
    if isinstance(prompt, list):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                return str(content)
    return str(prompt)


def eval_view(row: dict[str, Any]) -> EvalView:
    return EvalView(
        id=row["id"],
        ts=parse_time(row["ts"]),
        phase=row["phase"],
        adapter_version=row.get("adapter_version"),
        passed=row.get("passed"),
        score=row.get("score"),
        question=_clip(question_text(row.get("prompt"))),
        cloud_answer=_clip(row.get("cloud_answer")),
        local_answer=None if row.get("local_answer") is None else _clip(row["local_answer"]),
        reason=row.get("reason"),
        error=row.get("error"),
    )


def _latest_adapter(controller: AdaptiveController, route: str) -> dict[str, Any] | None:
    latest = controller.adapters.latest(route)
    if latest is None:
        return None
    meta: dict[str, Any] = {key: latest.meta[key] for key in _ADAPTER_FIELDS if key in latest.meta}
    meta["version"] = latest.version
    history = meta.get("loss_history")
    if isinstance(history, list):
        meta["loss_history"] = history[-200:]
    return meta


def _rolling_threshold(route: RouteSettings) -> float:
    bar = route.policy.min_rolling_score
    return route.policy.threshold if bar is None else bar


def route_view(
    services: Services, route: RouteSettings, series: list[Point], totals: RouteTotals
) -> DashboardRoute:
    """One route's dashboard card. Blocking (store and adapter files): call from a thread."""
    view: dict[str, Any] = {
        "name": route.name,
        "adapt": route.adapt,
        "upstream_model": route.upstream_model,
        "match": route.match,
        "mode": "cloud",
        "serving": "cloud",
        "threshold": route.policy.threshold,
        "rolling_threshold": _rolling_threshold(route),
        "window_size": route.policy.window,
        "history": [],
        "series": [SeriesPoint.model_validate(asdict(point)) for point in series],
        "scores": [],
        "evals": [],
        "totals": totals,
    }
    controller = services.controller
    if controller is not None and route.name in controller.routes:
        state = controller.describe(route.name)
        view.update(
            {key: state.get(key) for key in ("mode", "serving", "pinned", "rolling_score", "pass_rate")}
        )
        view.update(
            active_adapter=state.get("active_adapter"),
            candidate_adapter=state.get("candidate_adapter"),
            blocked=state.get("blocked") or state.get("held_back"),
            eval_deadline=state.get("eval_deadline"),
            pending_pairs=state.get("pending_pairs"),
            min_samples=state.get("min_samples"),
            job=state.get("job"),
            history=state.get("history", []),
            latest_adapter=_latest_adapter(controller, route.name),
        )
        rows = services.store.list_evals(route.name, SCORE_POINTS)
        view["scores"] = [
            ScorePoint(ts=parse_time(r["ts"]), score=r.get("score"), passed=r.get("passed"), phase=r["phase"])
            for r in reversed(rows)
        ]
        view["evals"] = [eval_view(row) for row in rows[:EVAL_CARDS]]
    return DashboardRoute.model_validate(view)
