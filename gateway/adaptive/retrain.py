"""What a route's next training job is: a first job, or a retrain that continues from the
last adapter judged and learns first from what that adapter got wrong.

A retrain's size is a budget in examples (trainer.spec), never the size of the log, so each
retrain costs no more than the first job however much traffic arrived meanwhile.
"""

from __future__ import annotations

from typing import Any

from gateway.settings import RouteSettings
from trainer.adapters import AdapterRegistry
from trainer.spec import TrainSpec, default_threads


def next_job(
    route: RouteSettings,
    previous: int | None,
    adapters: AdapterRegistry,
    evals: list[dict[str, Any]],
    local_serving: bool,
    store_url: str | None = None,
) -> tuple[TrainSpec, list[dict[str, Any]]]:
    """(spec, failed pairs) for the route's next job. `previous` is the rejected candidate,
    else the serving adapter; `evals` are the route's recent eval rows (those of `previous`
    that failed are trained on first; pass none for tool-calling adapters, whose eval rows
    keep the answer only as text). The job takes every core unless the local model serves,
    then half; `training.threads` overrides. The job reads pairs from `store_url`, the
    gateway's own store."""
    training = dict(route.training, store_url=store_url)
    training.setdefault("threads", default_threads(local_serving))
    first = TrainSpec(base_model=route.local_model, **training)
    if previous is None:
        return first, []
    try:
        found = adapters.get(route.name, previous)
    except (KeyError, LookupError, OSError):
        return first, []
    if found.meta.get("base_model") not in (None, route.local_model):
        return first, []  # the route moved to another base model: start afresh
    failed = [row for row in evals if row.get("adapter_version") == previous and row.get("passed") == 0]
    return TrainSpec(base_model=route.local_model, init_adapter=found.path, **training), failed
