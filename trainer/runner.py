"""One training job inside this process: collect pairs → split → train → publish a version,
reporting every stage to the status file. The CLI runs it; the gateway runs the CLI as a
subprocess through `JobManager`."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.adapters import HELDOUT_FILE, TRAIN_FILE, AdapterRegistry, AdapterVersion
from trainer.dataset import (
    Conversion,
    Sample,
    data_hash,
    load_route_records,
    load_samples,
    records_to_samples,
    split_samples,
    write_jsonl,
)
from trainer.errors import DataError, TrainerError
from trainer.locks import hold_route_lock
from trainer.progress import JobStatus, ProgressReporter, read_status, utc_now
from trainer.spec import TrainSpec
from trainer.train import TrainResult, train_adapter

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
    return records_to_samples(load_route_records(data_dir, route))


def describe(exc: BaseException) -> str:
    """A one-line reason for the status file; unexpected errors keep their type name."""
    if isinstance(exc, TrainerError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run_job(ctx: JobContext, spec: TrainSpec) -> JobStatus:
    """Run the job to completion; on any failure the status file ends as `error` with the
    reason and the exception propagates."""
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


def _train_and_publish(
    ctx: JobContext, spec: TrainSpec, reporter: ProgressReporter
) -> tuple[AdapterVersion, TrainResult]:
    started = time.perf_counter()
    reporter.update(message="preparing data")
    conversion = collect_samples(spec, ctx.data_dir, ctx.route)
    if not conversion.samples:
        raise DataError(f"no usable pairs for route {ctx.route!r} (skipped: {dict(conversion.skipped)})")
    train, heldout = split_samples(conversion.samples, spec.eval_fraction)
    log.info(
        "route %s: %d train, %d held out, skipped %s",
        ctx.route,
        len(train),
        len(heldout),
        dict(conversion.skipped),
    )
    registry = AdapterRegistry(ctx.data_dir)
    with registry.staging(ctx.route, ctx.job_id) as stage:
        write_jsonl(stage / TRAIN_FILE, train)
        write_jsonl(stage / HELDOUT_FILE, heldout)
        cache_root = spec.model_cache or ctx.data_dir
        result = train_adapter(
            stage / TRAIN_FILE, stage / HELDOUT_FILE, spec, stage, cache_root, reporter.update
        )
        meta = build_meta(ctx, spec, conversion, (train, heldout), result, reporter.current, started)
        version = registry.commit(ctx.route, stage, meta)
    return version, result


def build_meta(
    ctx: JobContext,
    spec: TrainSpec,
    conversion: Conversion,
    split: tuple[list[Sample], list[Sample]],
    result: TrainResult,
    status: JobStatus,
    started: float,
) -> dict[str, Any]:
    """meta.json of a new adapter version (the registry adds route, version, created_at)."""
    train, heldout = split
    return {
        "job_id": ctx.job_id,
        "base_model": spec.base_model,
        "base_model_path": result.base_model_path,
        "init_adapter": str(spec.init_adapter) if spec.init_adapter else None,
        "data_source": str(spec.data) if spec.data else "log store",
        "data_hash": data_hash(conversion.samples),
        "sample_count": len(conversion.samples),
        "train_count": len(train),
        "heldout_count": len(heldout),
        "skipped": dict(conversion.skipped),
        "dropped_examples": result.dropped_examples,
        "hyperparameters": {**spec.hyperparameters(), "epochs": result.epochs},
        "lora": result.lora,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "loss_history": result.loss_history,
        "total_steps": result.total_steps,
        "device": result.device,
        "dtype": result.dtype,
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
