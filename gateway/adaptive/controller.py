"""Drives each adaptive route through cloud → training → eval → local and back.

The proxy asks `serving()` who answers and reports each finished answer to `observe()`,
which never blocks the client: training checks, shadow evaluations and spot checks run as
background tasks. Every state change is persisted before it takes effect, so a restart
resumes where the route was.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.adaptive import policy
from gateway.adaptive.answers import answer_text
from gateway.adaptive.judges import Judge, JudgeError, Verdict, build_judge
from gateway.adaptive.policy import EvalOutcome, Mode, RouteState
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.local.client import LocalBackendClient, LocalBackendError, adapter_name
from gateway.metrics import Metrics
from gateway.settings import RouteSettings, Settings
from gateway.store.base import EvalRecord, Store
from trainer.adapters import AdapterRegistry
from trainer.jobs import JobManager
from trainer.spec import TrainSpec

log = logging.getLogger("understudy.adaptive")

CloudCall = Callable[[str, dict[str, Any], str], Awaitable[dict[str, Any]]]
_TRAIN_CHECK_INTERVAL_S = 1.0
# Shadow work is sampled evidence, not a queue to drain: beyond this many at once, skip.
_MAX_SHADOW_TASKS = 4
_LOCAL_MAX_TOKENS = 512


@dataclass
class RouteRuntime:
    settings: RouteSettings
    state: RouteState
    judge: Judge
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_train_check: float = 0.0
    train_check_pending: bool = False

    @property
    def name(self) -> str:
        return self.settings.name


class AdaptiveController:
    def __init__(
        self, settings: Settings, store: Store, metrics: Metrics, local: LocalBackendClient, cloud: CloudCall
    ):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.local = local
        self.cloud = cloud
        self.jobs = JobManager(settings.data_dir)
        self.adapters = AdapterRegistry(settings.data_dir)
        self.routes: dict[str, RouteRuntime] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shadow_slots = asyncio.Semaphore(_MAX_SHADOW_TASKS)

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.jobs.recover)
        for route in self.settings.all_routes():
            if route.adapt:
                self.routes[route.name] = await self._load(route)
        for runtime in self.routes.values():
            self._publish_mode(runtime)
            self._resume(runtime)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.aclose(cancel_running=True)

    async def _load(self, route: RouteSettings) -> RouteRuntime:
        saved = await asyncio.to_thread(self.store.load_route_state, route.name)
        state = RouteState.from_json(saved, route.policy.window) if saved else RouteState(route.name)
        judge = build_judge(
            route.policy.judge, route.policy.threshold, self._judge_model(route), self._judge_call(route)
        )
        return RouteRuntime(route, state, judge)

    def _judge_model(self, route: RouteSettings) -> str:
        return route.upstream_model or (
            route.match[0] if route.match and "*" not in route.match[0] else "gpt-4o-mini"
        )

    def _judge_call(self, route: RouteSettings) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def call(body: dict[str, Any]) -> dict[str, Any]:
            return await self.cloud(route.name, body, "judge")

        return call

    def _resume(self, runtime: RouteRuntime) -> None:
        state = runtime.state
        if state.mode == "training" and state.job_id:
            self._spawn(self._watch_job(runtime, state.job_id))
        elif state.mode == "training":
            self._spawn(
                self._change(
                    runtime,
                    lambda s: policy.training_failed(s, runtime.settings.policy, "lost job", time.time()),
                )
            )

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("adaptive task failed", exc_info=task.exception())

    # --- what the proxy asks -------------------------------------------------------------

    def serving(self, route: str) -> str | None:
        """The adapter that should answer this route's traffic, or None for the cloud."""
        runtime = self.routes.get(route)
        if runtime is None or runtime.state.serving_mode != "local" or runtime.state.active_version is None:
            return None
        return adapter_name(route, runtime.state.active_version)

    def failover_adapter(self, route: str) -> str | None:
        """An adapter that passed eval and may answer while the cloud is failing."""
        runtime = self.routes.get(route)
        if runtime is None or runtime.state.active_version is None:
            return None
        return adapter_name(route, runtime.state.active_version)

    async def ensure_loaded(self, route: str, name: str) -> None:
        version = int(name.rsplit("-v", 1)[1])
        await self.local.ensure_adapter(name, self.adapters.path(route, version))

    def observe(
        self,
        route: str,
        backend: str,
        endpoint: str,
        ok: bool,
        request: dict[str, Any] | None,
        answer: dict[str, Any] | None,
    ) -> None:
        """A request finished; schedule whatever learning it feeds. Never blocks."""
        runtime = self.routes.get(route)
        if (
            runtime is None
            or not ok
            or request is None
            or answer is None
            or endpoint != "/v1/chat/completions"
        ):
            return
        state = runtime.state
        if backend == "cloud" and state.mode == "eval" and state.candidate_version is not None:
            self._spawn_shadow(self._shadow_eval(runtime, request, answer))
        elif backend == "cloud" and state.mode == "cloud" and not runtime.train_check_pending:
            runtime.train_check_pending = True
            self._spawn(self._train_check_soon(runtime))
        elif backend == "local" and random.random() < runtime.settings.policy.eval_rate:
            self._spawn_shadow(self._spot_check(runtime, request, answer))

    def _spawn_shadow(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        if self._shadow_slots.locked():
            coroutine.close()
            return
        self._spawn(self._with_slot(coroutine))

    async def _with_slot(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        async with self._shadow_slots:
            await coroutine

    # --- training ------------------------------------------------------------------------

    async def _train_check_soon(self, runtime: RouteRuntime) -> None:
        """Count new pairs at most once a second, and always once after the latest answer."""
        wait = runtime.last_train_check + _TRAIN_CHECK_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        runtime.train_check_pending = False
        runtime.last_train_check = time.monotonic()
        await self._maybe_train(runtime)

    async def _maybe_train(self, runtime: RouteRuntime, force: bool = False) -> str | None:
        async with runtime.lock:
            state = runtime.state
            count, newest = await asyncio.to_thread(
                self.store.count_usable_pairs, runtime.name, state.trained_through_id
            )
            if not force and not policy.ready_to_train(state, runtime.settings.policy, count, time.time()):
                return None
            spec = TrainSpec(base_model=runtime.settings.local_model, **runtime.settings.training)
            job_id = await self.jobs.start(runtime.name, spec)
            policy.training_started(state, job_id, newest, time.time())
            await self._persist(runtime)
        self._spawn(self._watch_job(runtime, job_id))
        return job_id

    async def _watch_job(self, runtime: RouteRuntime, job_id: str) -> None:
        final = await self.jobs.wait(job_id) or {"status": "error", "message": "job vanished"}
        self.metrics.training_jobs.labels(runtime.name, final["status"]).inc()
        if final["status"] != "completed" or not final.get("adapter_path"):
            reason = str(final.get("message") or "training failed")
            await self._change(
                runtime, lambda s: policy.training_failed(s, runtime.settings.policy, reason, time.time())
            )
            return
        version = int(Path(final["adapter_path"]).name.lstrip("v"))
        try:
            await self.local.ensure_adapter(adapter_name(runtime.name, version), Path(final["adapter_path"]))
        except LocalBackendError as exc:
            reason = f"could not load the adapter: {exc}"
            await self._change(
                runtime, lambda s: policy.training_failed(s, runtime.settings.policy, reason, time.time())
            )
            return
        window = runtime.settings.policy.window
        await self._change(runtime, lambda s: policy.training_completed(s, version, window, time.time()))
        self._spawn(self._heldout_eval(runtime, version))

    # --- evaluation ----------------------------------------------------------------------

    async def _heldout_eval(self, runtime: RouteRuntime, version: int) -> None:
        path = self.adapters.get(runtime.name, version).heldout_path
        samples = await asyncio.to_thread(_read_heldout, path)
        for messages in samples:
            state = runtime.state
            if state.mode != "eval" or state.candidate_version != version:
                return
            request = {"messages": messages[:-1]}
            cloud = {"choices": [{"index": 0, "message": messages[-1], "finish_reason": "stop"}]}
            await self._evaluate(runtime, "heldout", version, request, cloud, None)

    async def _shadow_eval(
        self, runtime: RouteRuntime, request: dict[str, Any], cloud: dict[str, Any]
    ) -> None:
        version = runtime.state.candidate_version
        if version is not None:
            await self._evaluate(runtime, "eval", version, request, cloud, None)

    async def _spot_check(
        self, runtime: RouteRuntime, request: dict[str, Any], local: dict[str, Any]
    ) -> None:
        version = runtime.state.active_version
        if version is None:
            return
        try:
            cloud = await self.cloud(runtime.name, {**request, "stream": False}, "shadow")
        except Exception as exc:  # a spot check is best effort: the cloud may be down
            log.warning("spot check for %s skipped: %s", runtime.name, exc)
            return
        await self._evaluate(runtime, "spot", version, request, cloud, local)

    async def _local_answer(
        self, runtime: RouteRuntime, version: int, request: dict[str, Any], cloud: dict[str, Any]
    ) -> dict[str, Any]:
        name = adapter_name(runtime.name, version)
        await self.local.ensure_adapter(name, self.adapters.path(runtime.name, version))
        body = {k: v for k, v in request.items() if k not in ("stream", "stream_options", "n")}
        body["model"] = name
        body["max_tokens"] = eval_max_tokens(request, cloud)
        return await self.local.chat(body)

    async def _evaluate(
        self,
        runtime: RouteRuntime,
        phase: str,
        version: int,
        request: dict[str, Any],
        cloud: dict[str, Any],
        local: dict[str, Any] | None,
    ) -> None:
        started = time.perf_counter()
        verdict: Verdict | None = None
        error: str | None = None
        try:
            if local is None:
                local = await self._local_answer(runtime, version, request, cloud)
            verdict = await runtime.judge.judge(request, cloud, local)
        except (JudgeError, LocalBackendError) as exc:
            error = str(exc)
        latency = (time.perf_counter() - started) * 1000
        await asyncio.to_thread(
            self.store.insert_eval,
            _eval_record(runtime, phase, version, request, cloud, local, verdict, error, latency),
        )
        if verdict is None:
            self.metrics.evals.labels(runtime.name, "judge_error").inc()
            return
        self.metrics.evals.labels(runtime.name, "pass" if verdict.passed else "fail").inc()
        outcome = EvalOutcome(verdict.passed, verdict.score)
        apply = policy.record_spot_check if phase == "spot" else policy.record_eval
        await self._change(runtime, lambda s: apply(s, runtime.settings.policy, outcome, time.time()))

    # --- admin ---------------------------------------------------------------------------

    def runtime(self, route: str) -> RouteRuntime:
        runtime = self.routes.get(route)
        if runtime is None:
            raise NotFound(f"route {route!r} is not adaptive (set adapt: true in gateway.yaml)")
        return runtime

    async def set_mode(self, route: str, mode: str) -> None:
        runtime = self.runtime(route)
        if mode not in ("cloud", "local", "auto"):
            raise InvalidRequest("mode must be one of cloud, local, auto")
        if mode == "local" and runtime.state.active_version is None:
            raise Conflict(f"route {route!r} has no adapter that passed eval to serve locally")

        def pin(state: RouteState) -> None:
            state.pinned = None if mode == "auto" else mode  # type: ignore[assignment]
            state.history.append(
                {"ts": time.time(), "from": state.mode, "to": state.mode, "reason": f"pinned: {mode}"}
            )

        await self._change(runtime, pin)

    async def train_now(self, route: str) -> str:
        runtime = self.runtime(route)
        if runtime.state.job_id is not None:
            raise Conflict(f"route {route!r} already has a training job ({runtime.state.job_id})")
        job_id = await self._maybe_train(runtime, force=True)
        assert job_id is not None
        return job_id

    async def eval_now(self, route: str) -> int:
        """Re-run the held-out evaluation of the candidate (or serving) adapter."""
        runtime = self.runtime(route)
        version = runtime.state.candidate_version or runtime.state.active_version
        if version is None:
            raise Conflict(f"route {route!r} has no adapter to evaluate")
        self._spawn(self._heldout_eval(runtime, version))
        return version

    async def set_adapter(self, route: str, version: int) -> None:
        runtime = self.runtime(route)
        path = self.adapters.path(route, version)
        await self.local.ensure_adapter(adapter_name(route, version), path)

        def activate(state: RouteState) -> None:
            state.active_version = version
            state.history.append(
                {
                    "ts": time.time(),
                    "from": state.mode,
                    "to": state.mode,
                    "reason": f"adapter set to v{version}",
                }
            )

        await self._change(runtime, activate)

    def describe(self, route: str) -> dict[str, Any]:
        state = self.runtime(route).state
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
            "job": self.jobs.status(state.job_id) if state.job_id else None,
            "history": state.history[-50:],
        }

    # --- persistence ---------------------------------------------------------------------

    async def _change(self, runtime: RouteRuntime, mutate: Callable[[RouteState], None]) -> None:
        """Apply one state change and persist it before anything else sees it."""
        async with runtime.lock:
            before = runtime.state.mode
            mutate(runtime.state)
            await self._persist(runtime)
        if runtime.state.mode != before:
            log.info(
                "route %s: %s -> %s (%s)",
                runtime.name,
                before,
                runtime.state.mode,
                runtime.state.history[-1]["reason"],
            )
        self._publish_mode(runtime)

    async def _persist(self, runtime: RouteRuntime) -> None:
        await asyncio.to_thread(self.store.save_route_state, runtime.name, runtime.state.to_json())

    def _publish_mode(self, runtime: RouteRuntime) -> None:
        current: Mode = runtime.state.mode
        for mode in policy.MODES:
            self.metrics.route_mode.labels(runtime.name, mode).set(1 if mode == current else 0)
        score = runtime.state.rolling_score
        if score is not None:
            self.metrics.eval_score.labels(runtime.name).set(score)


def eval_max_tokens(request: dict[str, Any], cloud: dict[str, Any]) -> int:
    """The local answer's token budget: the request's own, else (held-out samples carry none)
    room for an answer about twice as long as the cloud's; never beyond _LOCAL_MAX_TOKENS."""
    asked = request.get("max_tokens") or request.get("max_completion_tokens")
    if isinstance(asked, int) and asked > 0:
        return min(asked, _LOCAL_MAX_TOKENS)
    return min(_LOCAL_MAX_TOKENS, max(32, len(answer_text(cloud)) // 2))


def _read_heldout(path: Path) -> list[list[dict[str, Any]]]:
    if not path.is_file():
        return []
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = orjson.loads(line).get("messages") if line.strip() else None
        if messages and messages[-1].get("role") == "assistant":
            samples.append(messages)
    return samples


def _eval_record(
    runtime: RouteRuntime,
    phase: str,
    version: int,
    request: dict[str, Any],
    cloud: dict[str, Any],
    local: dict[str, Any] | None,
    verdict: Verdict | None,
    error: str | None,
    latency_ms: float,
) -> EvalRecord:
    return EvalRecord(
        ts=time.time(),
        route=runtime.name,
        adapter_version=version,
        phase=phase,
        judge=runtime.judge.name,
        passed=None if verdict is None else verdict.passed,
        score=None if verdict is None else verdict.score,
        scores=None if verdict is None else orjson.dumps(verdict.scores).decode(),
        prompt=orjson.dumps(request.get("messages", request)).decode(),
        cloud_answer=orjson.dumps(answer_text(cloud)).decode(),
        local_answer=None if local is None else orjson.dumps(answer_text(local)).decode(),
        reason=None if verdict is None else verdict.reason,
        error=error,
        latency_ms=round(latency_ms, 1),
    )
