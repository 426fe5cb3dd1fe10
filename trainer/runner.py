"""One training job inside this process: collect pairs → split → train → publish a version,
reporting every stage to the status file. The CLI runs it; the gateway runs the CLI as a
subprocess through `JobManager`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.adapters import HELDOUT_FILE, TRAIN_FILE, AdapterRegistry, AdapterVersion
from trainer.dataset import (
    Conversion,
    Sample,
    data_hash,
    default_store_url,
    heldout_bucket,
    load_imports,
    load_route_records,
    load_samples,
    offers_tools,
    origin_counts,
    prompt_key,
    records_to_samples,
    split_samples,
    split_train_only,
    write_jsonl,
)
from trainer.errors import DataError, TrainerError
from trainer.locks import hold_route_lock
from trainer.progress import JobStatus, ProgressReporter, StatusWatcher, read_status, utc_now
from trainer.selection import TrainingSet, load_failed, seen_prompts, select_training_set
from trainer.spec import TrainSpec
from trainer.train import DataFiles, TrainResult, train_adapter

VALIDATION_FILE = "validation.jsonl"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """Where a job reads and writes: its route, the data dir and its status file."""

    route: str
    data_dir: Path
    job_id: str
    status_path: Path


def collect_samples(spec: TrainSpec, data_dir: Path, route: str) -> Conversion:
    """Usable samples from `spec.data` when given, else from the route's log store."""
    if spec.data is not None:
        return load_samples(spec.data)
    conversion = records_to_samples(load_route_records(spec.store_url or default_store_url(data_dir), route))
    conversion.samples.extend(load_imports(data_dir, route))
    return conversion


def describe(exc: BaseException) -> str:
    """A one-line reason for the status file; unexpected errors keep their type name."""
    if isinstance(exc, TrainerError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run_job(ctx: JobContext, spec: TrainSpec, watchers: Sequence[StatusWatcher] = ()) -> JobStatus:
    """Run the job to completion; on any failure the status file ends as `error` with the
    reason and the exception propagates. `watchers` see every status (e.g. a terminal bar)."""
    previous = read_status(ctx.status_path)
    started_at = utc_now()
    reporter = ProgressReporter(
        ctx.status_path,
        JobStatus(
            status="training",
            message="starting",
            job_id=ctx.job_id,
            route=ctx.route,
            pid=os.getpid(),
            created_at=previous.created_at if previous else started_at,
            started_at=started_at,
        ),
        watchers,
    )
    try:
        with hold_route_lock(ctx.data_dir, ctx.route, ctx.job_id):
            version, result = _train_and_publish(ctx, spec, reporter)
    except BaseException as exc:
        reporter.finish("error", describe(exc))
        raise
    log.info("route %s: adapter v%d at %s", ctx.route, version.version, version.path)
    return reporter.finish(
        "completed",
        f"adapter v{version.version} trained on {result.train_examples} examples",
        adapter_path=str(version.path),
        adapter_version=version.version,
        eval_loss=result.eval_loss,
    )


def choose_training_set(spec: TrainSpec, pool: list[Sample], heldout: list[Sample]) -> TrainingSet:
    """The capped, diverse training set and the validation slice, from the non-held-out pool
    plus the failed pairs (those whose prompt is held out stay with the judge)."""
    failed = load_failed(spec.failed_data) if spec.failed_data else []
    judged = {prompt_key(s) for s in heldout}
    trainable_failed = [
        s for s in failed if prompt_key(s) not in judged and heldout_bucket(s) >= spec.eval_fraction
    ]
    seen = seen_prompts(spec.init_adapter, (TRAIN_FILE, VALIDATION_FILE))
    return select_training_set(pool, spec, trainable_failed, seen)


def _train_and_publish(
    ctx: JobContext, spec: TrainSpec, reporter: ProgressReporter
) -> tuple[AdapterVersion, TrainResult]:
    started = time.perf_counter()
    reporter.update(message="preparing data")
    conversion = collect_samples(spec, ctx.data_dir, ctx.route)
    if not conversion.samples:
        raise DataError(f"no usable pairs for route {ctx.route!r} (skipped: {dict(conversion.skipped)})")
    judged, train_only = split_train_only(conversion.samples)
    pool, heldout = split_samples(judged, spec.eval_fraction)  # never a synthetic pair
    chosen = choose_training_set(spec, pool + train_only, heldout)
    log.info(
        "route %s: %d train, %d validation, %d held out (%s), skipped %s",
        ctx.route,
        len(chosen.train),
        len(chosen.validation),
        len(heldout),
        chosen.counts,
        dict(conversion.skipped),
    )
    registry = AdapterRegistry(ctx.data_dir, spec.adapters_dir)
    with registry.staging(ctx.route, ctx.job_id) as stage:
        files = DataFiles(stage / TRAIN_FILE, stage / HELDOUT_FILE, stage / VALIDATION_FILE)
        write_jsonl(files.train, chosen.train)
        write_jsonl(stage / VALIDATION_FILE, chosen.validation)
        write_jsonl(files.heldout, heldout)
        cache_root = spec.model_cache or ctx.data_dir
        result = train_adapter(files, spec, stage, cache_root, reporter.update)
        meta = build_meta(ctx, spec, conversion, (chosen, heldout), result, reporter.current, started)
        version = registry.commit(ctx.route, stage, meta)
    return version, result


def build_meta(
    ctx: JobContext,
    spec: TrainSpec,
    conversion: Conversion,
    split: tuple[TrainingSet, list[Sample]],
    result: TrainResult,
    status: JobStatus,
    started: float,
) -> dict[str, Any]:
    """meta.json of a new adapter version (the registry adds route, version, created_at)."""
    chosen, heldout = split
    return {
        "job_id": ctx.job_id,
        "base_model": spec.base_model,
        "base_model_path": result.base_model_path,
        "init_adapter": str(spec.init_adapter) if spec.init_adapter else None,
        "data_source": str(spec.data) if spec.data else "log store",
        "data_hash": data_hash(conversion.samples),
        "sample_count": len(conversion.samples),
        **origin_counts(conversion.samples),
        "train_count": len(chosen.train),
        "trained_with_tools": offers_tools(chosen.train),
        "validation_count": len(chosen.validation),
        "heldout_count": len(heldout),
        "selection": chosen.counts,
        "skipped": dict(conversion.skipped),
        "dropped_examples": result.dropped_examples,
        "hyperparameters": {**spec.hyperparameters(), "epochs": result.epochs},
        "lora": result.lora,
        "train_loss": result.train_loss,
        "validation_loss": result.validation_loss,
        "eval_loss": result.eval_loss,
        "loss_history": result.loss_history,
        "loss_curve": result.loss_curve,
        "total_steps": result.total_steps,
        "steps_run": result.total_steps,
        "planned_steps": result.planned_steps,
        "examples_seen": result.total_steps * spec.batch_size * spec.grad_accum,
        "stop_reason": result.stop_reason,
        "device": result.device,
        "dtype": result.dtype,
        "threads": result.threads,
        "timing": {
            "started_at": status.started_at,
            "finished_at": utc_now(),
            "total_seconds": round(time.perf_counter() - started, 3),
            "train_seconds": result.train_seconds,
            "seconds_per_step": result.seconds_per_step,
            "samples_per_second": result.samples_per_second,
        },
        "eval_scores": {},
    }


def export_samples(spec: TrainSpec, data_dir: Path, route: str, path: Path) -> Conversion:
    """Write the route's usable pairs (before the split) as JSONL, for inspection."""
    conversion = collect_samples(spec, data_dir, route)
    write_jsonl(path, conversion.samples)
    return conversion
