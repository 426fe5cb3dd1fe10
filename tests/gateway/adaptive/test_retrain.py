"""The next training job a route gets: a retrain continues from the adapter eval turned down
and learns first from what it got wrong; a first job (or a new base model) starts afresh."""

from __future__ import annotations

from pathlib import Path

from gateway.adaptive.policy import EvalOutcome, RouteState, record_eval, training_completed
from gateway.adaptive.retrain import next_job
from gateway.settings import PolicySettings, RouteSettings
from trainer.adapters import AdapterRegistry


def _publish(registry: AdapterRegistry, tmp_path: Path, base: str) -> int:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "adapter_config.json").write_text("{}")
    return registry.commit("r", staging, {"base_model": base}).version


def test_a_retrain_starts_from_the_rejected_candidate_and_its_failures(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    version = _publish(registry, tmp_path, "base-a")
    route = RouteSettings(name="r", adapt=True, local_model="base-a", training={"threads": 1})
    state = RouteState("r", mode="training")
    training_completed(state, version, window_size=50, now=0)
    for _ in range(5):
        record_eval(state, PolicySettings(), EvalOutcome(False, 10.0), now=1)
    assert state.mode == "cloud" and state.rejected_version == version
    evals = [
        {"adapter_version": version, "passed": 0, "prompt": "[]", "cloud_answer": '"a"'},
        {"adapter_version": version, "passed": 1, "prompt": "[]", "cloud_answer": '"b"'},
        {"adapter_version": version, "passed": None, "prompt": "[]", "cloud_answer": '"c"'},
        {"adapter_version": version + 7, "passed": 0, "prompt": "[]", "cloud_answer": '"d"'},
    ]
    spec, failed = next_job(route, state.rejected_version, registry, evals, False, "sqlite:///x.db")
    assert spec.init_adapter == registry.path("r", version)
    assert [row["cloud_answer"] for row in failed] == ['"a"']
    assert spec.threads == 1  # the route's override wins
    assert spec.store_url == "sqlite:///x.db"  # the gateway names its store; the trainer builds no path


def test_a_first_job_or_another_base_starts_afresh_with_the_machines_cores(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "data")
    version = _publish(registry, tmp_path, "base-a")
    moved = RouteSettings(name="r", adapt=True, local_model="base-b")
    spec, failed = next_job(moved, version, registry, [{"adapter_version": version, "passed": 0}], False)
    assert spec.init_adapter is None and failed == []
    spec, _ = next_job(moved, None, registry, [], local_serving=False)
    idle_threads = spec.threads
    spec, _ = next_job(moved, None, registry, [], local_serving=True)
    assert idle_threads is not None and spec.threads is not None
    assert spec.threads == max(1, idle_threads // 2)
