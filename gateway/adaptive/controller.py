"""Drives each adaptive route through cloud → training → eval → local and back.

The proxy asks `serving()` who answers and reports each finished answer to `observe()`,
which never blocks the client: training checks, shadow evaluations and spot checks run as
background tasks. Every state change is persisted before it takes effect, so a restart
resumes where the route was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.adaptive import policy
from gateway.adaptive.eligibility import AdapterTraits
from gateway.adaptive.evaluation import eval_max_tokens, eval_record, read_heldout
from gateway.adaptive.judges import Judge, Verdict, build_judge
from gateway.adaptive.policy import EvalOutcome, Mode, RouteState
from gateway.adaptive.retrain import next_job
from gateway.adaptive.synthetic import Synthesizer, pairs_wanted, real_requests, synthetic_pairs
from gateway.domain import LOCAL_ENDPOINT
from gateway.domain.exchange import Exchange
from gateway.errors import Conflict, GatewayError, InvalidRequest, NotFound
from gateway.imports import Imports
from gateway.local.client import LocalBackendClient, LocalBackendError, adapter_name
from gateway.metrics import Metrics
from gateway.settings import RouteSettings, Settings
from gateway.store.base import Store
from trainer.adapters import AdapterRegistry
from trainer.jobs import JobManager
from trainer.spec import TrainSpec

log = logging.getLogger("understudy.adaptive")

CloudCall = Callable[[str, dict[str, Any], str, str | None], Awaitable[dict[str, Any]]]
_TRAIN_CHECK_INTERVAL_S = 1.0
# Shadow work is sampled evidence, not a queue to drain: beyond this many at once, skip.
_MAX_SHADOW_TASKS = 4
# Fields that only mean something on a streamed request: the real API refuses
# `stream_options` on a non-streamed one, so a re-ask must drop them all.
_STREAM_ONLY_FIELDS = ("stream", "stream_options")
# Replicas share route state through the store: each looks for others' changes this often,
# and holds a route's training lease this long between renewals (a dead holder's expires).
_FOLLOW_S = 1.0
_LEASE_TTL_S = 60.0
_CAS_ATTEMPTS = 20


@dataclass
class RouteRuntime:
    settings: RouteSettings
    state: RouteState
    judge: Judge
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_train_check: float = 0.0
    train_check_pending: bool = False
    # The model the route's clients last asked for: held-out samples carry none, and an
    # upstream judge with no judge_model grades with it.
    last_model: str | None = None
    synthesizing: bool = False
    # The status of a job another replica runs for this route, as it last shared it.
    shared_job: dict[str, Any] | None = None
    # The stored state's version this replica last read or wrote (compare-and-set on it).
    version: int = 0
    # Usable pairs towards the next job, as last counted (None: not counted yet).
    pending_pairs: int | None = None

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
        self.jobs = JobManager(settings.data_dir, adapters_dir=settings.adapters_root)
        self.adapters = AdapterRegistry(settings.data_dir, settings.adapters_root)
        self.imports = Imports(settings.data_dir)
        self.routes: dict[str, RouteRuntime] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shadow_slots = asyncio.Semaphore(_MAX_SHADOW_TASKS)
        self._traits: dict[str, AdapterTraits] = {}
        # The local model's context in tokens (from its /v1/models), once known.
        self.local_context: int | None = None
        # Why no adapter could ever be served (the local backend's start-up LoRA self-test
        # failed): training is held while this is set, and /readyz shows it.
        self.blocked: str | None = None
        # Decides whether the gateway may spend on calls no client request pays for.
        self.pays_for_own_calls: Callable[[str], bool] = lambda route: True
        # What a cloud answer cost in USD (the synthetic-data cap counts it).
        self.price_answer: Callable[[dict[str, Any]], float] = lambda answer: 0.0
        # Who holds a route's training lease: this process, among every replica.
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.jobs.recover)
        for route in self.settings.all_routes():
            if route.adapt:
                self.routes[route.name] = await self._load(route)
        await self.check_local_backend()
        for runtime in self.routes.values():
            self._publish_mode(runtime)
            self._resume(runtime)
        if self.routes:
            self._spawn(self._follow_others())

    async def check_local_backend(self) -> None:
        """Learn the local model's context and whether it can generate with an adapter at
        all. A failed self-test (an incompatible transformers/peft pair, say) holds training,
        loudly: on /readyz, in the log, and in `understudy_local_selftest_ok`."""
        self.local_context = await self.local.context_length()
        error = await self.local.self_test_error()
        self.blocked = (
            None if error is None else f"the local backend cannot generate with an adapter: {error}"
        )
        self.metrics.local_selftest_ok.set(0 if error else 1)
        if self.blocked is not None:
            log.error("%s; training is held until it is fixed", self.blocked)
        for name in self.routes:
            self.metrics.route_blocked.labels(name, "selftest").set(1 if error else 0)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.aclose(cancel_running=True)

    async def _load(self, route: RouteSettings) -> RouteRuntime:
        judge = build_judge(
            route.policy.judge, route.policy.threshold, self._judge_model(route), self._judge_call(route)
        )
        runtime = RouteRuntime(route, RouteState(route.name), judge)
        await self._refresh(runtime)
        return runtime

    def _judge_model(self, route: RouteSettings) -> str | None:
        """The grader's model; None means the model of each request being judged."""
        return route.policy.judge_model or route.upstream_model

    def _judge_call(
        self, route: RouteSettings
    ) -> Callable[[dict[str, Any], str | None], Awaitable[dict[str, Any]]]:
        async def call(body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
            return await self.cloud(route.name, body, "judge", authorization)

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
        elif state.mode == "eval" and state.candidate_version is not None:
            self._spawn(self._eval_deadline(runtime, state.candidate_version))

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run `coroutine` as one of the controller's background tasks (cancelled at stop)."""
        self._spawn(coroutine)

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
        """The route's last promoted adapter, which may answer while the cloud is failing."""
        runtime = self.routes.get(route)
        if runtime is None or runtime.state.active_version is None:
            return None
        return adapter_name(route, runtime.state.active_version)

    async def ensure_loaded(self, route: str, name: str) -> None:
        version = int(name.rsplit("-v", 1)[1])
        await self.local.ensure_adapter(name, self.adapters.path(route, version))

    def traits(self, name: str) -> AdapterTraits:
        """What adapter `name` (ROUTE-vN) was trained on, read once from its meta.json."""
        traits = self._traits.get(name)
        if traits is None:
            route, version = name.rsplit("-v", 1)
            try:
                meta = self.adapters.get(route, int(version)).meta
            except (KeyError, LookupError, OSError, ValueError):
                meta = {}
            traits = AdapterTraits(trained_with_tools=bool(meta.get("trained_with_tools")))
            self._traits[name] = traits
        return traits

    def observe(self, ex: Exchange, ok: bool) -> None:
        """A user request finished; schedule whatever learning it feeds. Never blocks. The
        client's credentials go with the work they pay for, and die with it."""
        runtime = self.routes.get(ex.route)
        request, answer = ex.request_body, ex.answer
        if runtime is None or not ok or request is None or answer is None or ex.endpoint != LOCAL_ENDPOINT:
            return
        state = runtime.state
        runtime.last_model = ex.model or runtime.last_model
        if ex.backend == "cloud" and state.mode == "eval" and state.candidate_version is not None:
            if ex.local_skip is None:  # what the local model would not be asked, it is not judged on
                self._spawn_shadow(runtime, self._shadow_eval(runtime, request, answer, ex.authorization))
        elif ex.backend == "cloud" and state.mode == "cloud" and not runtime.train_check_pending:
            runtime.train_check_pending = True
            self._spawn(self._train_check_soon(runtime))
        elif ex.backend == "local" and random.random() < runtime.settings.policy.eval_rate:
            self._spawn_shadow(runtime, self._spot_check(runtime, request, answer, ex.authorization))

    def check_training(self, route: str) -> None:
        """New data arrived outside the traffic (an import): see whether the route can train."""
        runtime = self.routes.get(route)
        if runtime is not None and runtime.state.mode == "cloud":
            self._spawn(self._maybe_train(runtime))

    def _spawn_shadow(self, runtime: RouteRuntime, coroutine: Coroutine[Any, Any, Any]) -> None:
        if self._shadow_slots.locked():
            coroutine.close()
            self._skipped(runtime, "all shadow slots busy")
            return
        self._spawn(self._with_slot(coroutine))

    def _skipped(self, runtime: RouteRuntime, cause: str, exc: BaseException | None = None) -> None:
        """Evidence not gathered: counted, and its cause logged (with the traceback, at debug)."""
        self.metrics.evals.labels(runtime.name, "skipped").inc()
        log.debug("route %s: evaluation skipped: %s", runtime.name, cause, exc_info=exc)

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
            count += await asyncio.to_thread(self.imports.pairs_since, runtime.name, state.last_train_at)
            made, newest_made = await asyncio.to_thread(
                synthetic_pairs, self.store, runtime.name, state.trained_through_id
            )
            newest = max(newest, newest_made)
            runtime.pending_pairs = count + made
            self.metrics.route_pending_pairs.labels(runtime.name).set(count + made)
            if self.blocked is not None and not force:
                return None
            if not force and not policy.ready_to_train(
                state, runtime.settings.policy, count + made, time.time()
            ):
                self._maybe_synthesize(runtime, count, made)
                return None
            if not await self._take_training_lease(runtime, force):
                return None
            spec, failed = await self._job_spec(runtime)
            job_id = await self.jobs.start(runtime.name, spec, failed_pairs=failed)
            await self._save(runtime, lambda s: policy.training_started(s, job_id, newest, time.time()))
        self._spawn(self._watch_job(runtime, job_id))
        return job_id

    async def _take_training_lease(self, runtime: RouteRuntime, force: bool) -> bool:
        """Whether this replica may start the route's job: it holds the route's lease, and
        the state (re-read under the lease) still wants one. Another replica's job → no."""
        name = _lease(runtime)
        if not await asyncio.to_thread(self.store.acquire_lease, name, self.replica_id, _LEASE_TTL_S):
            if force:
                raise Conflict(f"route {runtime.name!r} is being trained by another replica")
            return False
        await self._refresh(runtime)
        if runtime.state.job_id is None and (force or runtime.state.mode == "cloud"):
            return True
        await asyncio.to_thread(self.store.release_lease, name, self.replica_id)
        if force:
            raise Conflict(f"route {runtime.name!r} already has a training job ({runtime.state.job_id})")
        return False

    async def _job_spec(self, runtime: RouteRuntime) -> tuple[TrainSpec, list[dict[str, Any]]]:
        previous = runtime.state.rejected_version or runtime.state.active_version
        rows: list[dict[str, Any]] = []
        if previous is not None and not self.traits(adapter_name(runtime.name, previous)).trained_with_tools:
            rows = await asyncio.to_thread(self.store.list_evals, runtime.name, 1000)
        serving = self._local_serving()
        return next_job(runtime.settings, previous, self.adapters, rows, serving, self.settings.store_url)

    def _local_serving(self) -> bool:
        return any(runtime.state.serving_mode == "local" for runtime in self.routes.values())

    async def _watch_job(self, runtime: RouteRuntime, job_id: str) -> None:
        """Follow this replica's job to its end, holding the route's lease meanwhile."""
        renewing = asyncio.create_task(self._renew_lease(runtime, job_id))
        try:
            await self._conclude_job(runtime, job_id)
        finally:
            renewing.cancel()
            await asyncio.to_thread(self.store.release_lease, _lease(runtime), self.replica_id)

    async def _renew_lease(self, runtime: RouteRuntime, job_id: str) -> None:
        while True:
            status = self.jobs.status(job_id)
            if status is not None:
                await asyncio.to_thread(self.store.save_job, job_id, runtime.name, status)
            if not await asyncio.to_thread(
                self.store.acquire_lease, _lease(runtime), self.replica_id, _LEASE_TTL_S
            ):
                log.warning(
                    "route %s: another replica took the training lease of job %s", runtime.name, job_id
                )
            await asyncio.sleep(min(_LEASE_TTL_S / 3, 2.0))

    async def _conclude_job(self, runtime: RouteRuntime, job_id: str) -> None:
        final = await self.jobs.wait(job_id) or {"status": "error", "message": "job vanished"}
        await asyncio.to_thread(self.store.save_job, job_id, runtime.name, final)
        self.metrics.training_jobs.labels(runtime.name, final["status"]).inc()
        if final["status"] != "completed" or not final.get("adapter_path"):
            reason = str(final.get("message") or "training failed")
            await self._change(
                runtime,
                _of_job(
                    job_id, lambda s: policy.training_failed(s, runtime.settings.policy, reason, time.time())
                ),
            )
            return
        version = int(Path(final["adapter_path"]).name.lstrip("v"))
        try:
            await self.local.ensure_adapter(adapter_name(runtime.name, version), Path(final["adapter_path"]))
        except LocalBackendError as exc:
            reason = f"could not load the adapter: {exc}"
            await self._change(
                runtime,
                _of_job(
                    job_id, lambda s: policy.training_failed(s, runtime.settings.policy, reason, time.time())
                ),
            )
            return
        window = max(runtime.settings.policy.window, runtime.settings.policy.promote_after)
        await self._change(
            runtime, _of_job(job_id, lambda s: policy.training_completed(s, version, window, time.time()))
        )
        self._spawn(self._eval_deadline(runtime, version))
        self._spawn(self._heldout_eval(runtime, version))

    async def _eval_deadline(self, runtime: RouteRuntime, version: int) -> None:
        """End the eval of `version` at its deadline if nothing decided it before. The loop
        sleeps on the event loop's monotonic clock, which may wake a hair before the wall
        clock the deadline is kept in (it survives restarts): so look again until it is due."""
        settings, state = runtime.settings.policy, runtime.state
        while (remaining := state.eval_started_at + settings.eval_timeout_s - time.time()) > 0:
            await asyncio.sleep(remaining + 0.01)
            if state.mode != "eval" or state.candidate_version != version:
                return
        await self._change(runtime, lambda s: policy.eval_expired(s, settings, version, time.time()))

    def _maybe_synthesize(self, runtime: RouteRuntime, real: int, made: int) -> None:
        """Top a thin route up with synthetic pairs (policy.synthetic) in the background."""
        wanted = pairs_wanted(runtime.settings.policy, runtime.state, real, made)
        if wanted <= 0 or runtime.synthesizing:
            return
        if not self.pays_for_own_calls(runtime.name):  # no client request pays for these calls
            self._skipped(runtime, "synthetic data needs the upstream's own key")
            return
        runtime.synthesizing = True
        self._spawn(self._synthesize(runtime, wanted))

    async def _synthesize(self, runtime: RouteRuntime, wanted: int) -> None:
        async def cloud(body: dict[str, Any], kind: str) -> dict[str, Any]:
            return await self.cloud(runtime.name, body, kind, None)

        try:
            seeds, known = await asyncio.to_thread(real_requests, self.store, runtime.name)
            spent = runtime.state.synthetic_spent_usd
            settings = runtime.settings.policy.synthetic
            outcome = await Synthesizer(settings, cloud, self.price_answer, seeds, known, spent).run(wanted)
            log.info("route %s: synthetic data: %d pairs, %s", runtime.name, outcome.added, outcome.stopped)
            note = policy.synthetic_added
            await self._change(
                runtime, lambda s: note(s, outcome.added, outcome.spent_usd, outcome.stopped, time.time())
            )
        finally:
            runtime.synthesizing = False
        await self._maybe_train(runtime)

    # --- evaluation ----------------------------------------------------------------------

    async def _heldout_eval(self, runtime: RouteRuntime, version: int, whole: bool = False) -> None:
        """Judge `version` on the route's held-out split, replaying each sample's tools and
        response format, until eval has decided on it (the split grows with the route's log:
        replaying all of it after the decision would cost generations and judge calls for
        nothing); `whole`: all of it (an operator's eval of the serving adapter). No client
        request pays for these calls: without an upstream key of its own the gateway skips
        them (and counts them)."""
        samples = await asyncio.to_thread(read_heldout, self.adapters.get(runtime.name, version).heldout_path)
        if runtime.judge.name == "upstream" and not self.pays_for_own_calls(runtime.name):
            for _ in samples:
                self._skipped(runtime, "held-out eval needs the upstream's own key")
            return
        for request, cloud in samples:
            if "model" not in request and runtime.last_model:
                request["model"] = runtime.last_model
            state = runtime.state
            wanted = (
                (state.candidate_version,) if not whole else (state.candidate_version, state.active_version)
            )
            if version not in wanted:
                return
            await self._evaluate(runtime, "heldout", version, request, cloud, None, None)

    async def _shadow_eval(
        self, runtime: RouteRuntime, request: dict[str, Any], cloud: dict[str, Any], auth: str | None
    ) -> None:
        version = runtime.state.candidate_version
        if version is not None:
            await self._evaluate(runtime, "eval", version, request, cloud, None, auth)

    async def _spot_check(
        self, runtime: RouteRuntime, request: dict[str, Any], local: dict[str, Any], auth: str | None
    ) -> None:
        version = runtime.state.active_version
        if version is None:
            return
        asked = {k: v for k, v in request.items() if k not in _STREAM_ONLY_FIELDS}
        try:
            cloud = await self.cloud(runtime.name, asked, "shadow", auth)
        except GatewayError as exc:  # best effort: the cloud may be down or refuse
            self._skipped(runtime, f"the cloud's reference answer failed: {exc.message}", exc)
            return
        await self._evaluate(runtime, "spot", version, request, cloud, local, auth)

    async def _local_answer(
        self, runtime: RouteRuntime, version: int, request: dict[str, Any], cloud: dict[str, Any]
    ) -> dict[str, Any]:
        name = adapter_name(runtime.name, version)
        await self.local.ensure_adapter(name, self.adapters.path(runtime.name, version))
        body = {k: v for k, v in request.items() if k not in (*_STREAM_ONLY_FIELDS, "n")}
        body["model"] = name
        body["max_tokens"] = eval_max_tokens(request, cloud)
        body.pop("max_completion_tokens", None)
        return await self.local.chat(body)

    async def _evaluate(
        self,
        runtime: RouteRuntime,
        phase: str,
        version: int,
        request: dict[str, Any],
        cloud: dict[str, Any],
        local: dict[str, Any] | None,
        auth: str | None,
    ) -> None:
        started = time.perf_counter()
        verdict: Verdict | None = None
        error: str | None = None
        try:
            if local is None:
                local = await self._local_answer(runtime, version, request, cloud)
            verdict = await runtime.judge.judge(request, cloud, local, auth)
        except GatewayError as exc:  # JudgeError, LocalBackendError, a failing upstream
            error = str(exc)
        latency = (time.perf_counter() - started) * 1000
        await asyncio.to_thread(
            self.store.insert_eval,
            eval_record(runtime, phase, version, request, cloud, local, verdict, error, latency),
        )
        if verdict is None:
            self.metrics.evals.labels(runtime.name, "judge_error").inc()
            reason = error or "no verdict"
            await self._change(
                runtime, lambda s: policy.record_judge_error(s, runtime.settings.policy, reason, time.time())
            )
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
            policy.note(state, f"pinned: {mode}")

        await self._change(runtime, pin)

    async def train_now(self, route: str) -> str:
        runtime = self.runtime(route)
        if runtime.state.job_id is not None:
            raise Conflict(f"route {route!r} already has a training job ({runtime.state.job_id})")
        job_id = await self._maybe_train(runtime, force=True)
        assert job_id is not None
        return job_id

    async def eval_now(self, route: str) -> int:
        """Re-run the held-out evaluation of the candidate (or serving) adapter; its verdicts
        are recorded with phase `heldout` (and move the route only while it is in eval)."""
        runtime = self.runtime(route)
        version = runtime.state.candidate_version or runtime.state.active_version
        if version is None:
            raise Conflict(f"route {route!r} has no adapter to evaluate")
        self._spawn(self._heldout_eval(runtime, version, whole=version != runtime.state.candidate_version))
        return version

    async def set_adapter(self, route: str, version: int) -> None:
        runtime = self.runtime(route)
        path = self.adapters.path(route, version)
        await self.local.ensure_adapter(adapter_name(route, version), path)

        def activate(state: RouteState) -> None:
            state.active_version = version
            policy.note(state, f"adapter set to v{version}")

        await self._change(runtime, activate)

    def describe(self, route: str) -> dict[str, Any]:
        runtime = self.runtime(route)
        state = runtime.state
        job = (self.jobs.status(state.job_id) or runtime.shared_job) if state.job_id else None
        return {
            **policy.view(state, runtime.settings.policy),
            "job": job,
            "blocked": self.blocked,
            "pending_pairs": runtime.pending_pairs,
            "min_samples": runtime.settings.policy.min_samples,
        }

    def problems(self) -> list[str]:
        """Everything that keeps a route from learning, in words (for /readyz)."""
        found = [] if self.blocked is None else [self.blocked]
        now = time.time()
        stuck = (policy.stuck(name, r.state, r.settings.policy, now) for name, r in self.routes.items())
        return found + [problem for problem in stuck if problem]

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Each adaptive route's mode and its latest change, for /readyz."""
        return {name: policy.summary(runtime.state) for name, runtime in self.routes.items()}

    # --- persistence ---------------------------------------------------------------------

    async def _change(self, runtime: RouteRuntime, mutate: Callable[[RouteState], None]) -> None:
        """Apply one state change and persist it before anything else sees it."""
        async with runtime.lock:
            before = runtime.state.mode
            await self._save(runtime, mutate)
        if runtime.state.mode != before:
            log.info(
                "route %s: %s -> %s (%s)",
                runtime.name,
                before,
                runtime.state.mode,
                runtime.state.history[-1]["reason"],
            )
        self._publish_mode(runtime)

    async def _save(self, runtime: RouteRuntime, mutate: Callable[[RouteState], None]) -> None:
        """Apply `mutate` and compare-and-set the result on the stored version (the caller
        holds the route's lock). When another replica changed the route first, reload its
        state and apply `mutate` again: the rules are pure, so nobody's update is lost."""
        for _ in range(_CAS_ATTEMPTS):
            mutate(runtime.state)
            saved = await asyncio.to_thread(
                self.store.save_route_state, runtime.name, runtime.state.to_json(), runtime.version
            )
            if saved is not None:
                runtime.version = saved
                return
            await self._refresh(runtime)
        raise RuntimeError(f"route {runtime.name}: state kept changing under {_CAS_ATTEMPTS} attempts")

    async def _refresh(self, runtime: RouteRuntime) -> bool:
        """Read the stored state if it is newer than ours; in place, so every holder of
        `runtime.state` sees it. True when it changed."""
        saved = await asyncio.to_thread(self.store.load_route_state_versioned, runtime.name)
        if saved is None or saved[1] == runtime.version:
            return False
        fresh = RouteState.from_json(saved[0], runtime.settings.policy.window)
        vars(runtime.state).update(vars(fresh))
        runtime.version = saved[1]
        return True

    async def _follow_others(self) -> None:
        """Learn other replicas' changes (pins, promotions, verdicts, rollbacks) within about
        `_FOLLOW_S`, and take over a route whose training replica is gone."""
        while True:
            await asyncio.sleep(_FOLLOW_S)
            try:
                versions = await asyncio.to_thread(self.store.route_state_versions)
                for name, runtime in self.routes.items():
                    if versions.get(name, 0) != runtime.version:
                        await self._follow(runtime)
                    if runtime.state.job_id and self.jobs.status(runtime.state.job_id) is None:
                        await self._watch_remote_job(runtime, runtime.state.job_id)
            except Exception:  # the store is down for a moment: keep following, loudly
                log.warning("could not read the shared route state", exc_info=True)

    async def _follow(self, runtime: RouteRuntime) -> None:
        async with runtime.lock:
            before = runtime.state.mode
            if not await self._refresh(runtime):
                return
        if runtime.state.mode != before:
            log.info("route %s: %s -> %s (on another replica)", runtime.name, before, runtime.state.mode)
        self._publish_mode(runtime)

    async def _watch_remote_job(self, runtime: RouteRuntime, job_id: str) -> None:
        """Another replica runs this job: show its status, and when its lease has expired
        (that replica died), end the job as failed so the route can train again."""
        runtime.shared_job = await asyncio.to_thread(self.store.load_job, job_id)
        name = _lease(runtime)
        if not await asyncio.to_thread(self.store.acquire_lease, name, self.replica_id, _LEASE_TTL_S):
            return
        try:
            reason = "the replica running it is gone"
            await self._change(
                runtime,
                _of_job(
                    job_id, lambda s: policy.training_failed(s, runtime.settings.policy, reason, time.time())
                ),
            )
        finally:
            await asyncio.to_thread(self.store.release_lease, name, self.replica_id)

    def _publish_mode(self, runtime: RouteRuntime) -> None:
        current: Mode = runtime.state.mode
        for mode in policy.MODES:
            self.metrics.route_mode.labels(runtime.name, mode).set(1 if mode == current else 0)
        score = runtime.state.rolling_score
        if score is not None:
            self.metrics.eval_score.labels(runtime.name).set(score)
        held = policy.blocked_reason(runtime.state)
        for reason in ("training_failed", "rejected"):
            self.metrics.route_blocked.labels(runtime.name, reason).set(1 if held == reason else 0)


def _lease(runtime: RouteRuntime) -> str:
    return f"train/{runtime.name}"


def _of_job(job_id: str, mutate: Callable[[RouteState], None]) -> Callable[[RouteState], None]:
    """`mutate`, applied only while the route still runs `job_id` (a replica that reloads
    after a conflict must not end a job that is no longer the route's)."""

    def apply(state: RouteState) -> None:
        if state.job_id == job_id:
            mutate(state)

    return apply
