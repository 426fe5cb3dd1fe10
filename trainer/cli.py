"""`python -m trainer` / `understudy train`: map flags onto a TrainSpec and run one job.

The spec's flags are derived from `TrainSpec`'s fields (`lora_r` → `--lora-r`), so the job
manager's `TrainSpec.to_argv()` and this parser cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from trainer.errors import JobTerminated, TrainerError
from trainer.names import new_job_id, validate_job_id, validate_route
from trainer.offline import enforce_offline
from trainer.spec import TrainSpec

DEFAULT_DATA_DIR = ".understudy"
_ALIASES = {"learning_rate": ["--lr"], "grad_accum": ["--gradient-accumulation-steps"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="Train a LoRA adapter for a route from its logged pairs."
    )
    parser.add_argument(
        "--route", required=True, help="route name; the adapter goes to ADAPTERS_DIR/ROUTE/vN"
    )
    parser.add_argument("--data-dir", type=Path, help="default $UNDERSTUDY_DATA_DIR or ./.understudy")
    parser.add_argument("--job-id", help="default: a fresh ftjob-... id")
    parser.add_argument("--status-file", type=Path, help="default DATA_DIR/jobs/JOB_ID.json")
    parser.add_argument("--export", type=Path, metavar="FILE", help="only write the usable pairs as JSONL")
    parser.add_argument("--log-level", default="INFO")
    spec_group = parser.add_argument_group("training (TrainSpec)")
    for name, field in TrainSpec.model_fields.items():
        flags = ["--" + name.replace("_", "-"), *_ALIASES.get(name, [])]
        help_text = f"{field.description} (default: {field.default})"
        if field.annotation is bool:
            spec_group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            spec_group.add_argument(*flags, dest=name, help=help_text)
    parser.set_defaults(**dict.fromkeys(TrainSpec.model_fields))
    return parser


def spec_from_args(args: argparse.Namespace) -> TrainSpec:
    """The TrainSpec named by the parsed flags (unset flags keep the spec's defaults)."""
    given: dict[str, Any] = {name: getattr(args, name) for name in TrainSpec.model_fields}
    return TrainSpec.model_validate({name: value for name, value in given.items() if value is not None})


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise JobTerminated(signal.Signals(signum).name)


def _install_stop_handlers() -> dict[int, Any]:
    """SIGTERM/SIGINT raise JobTerminated, so the job unwinds: status `error`, staging removed.
    Only the main thread may set handlers (main() can also be called from a worker thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGINT)}


def main(argv: list[str] | None = None) -> int:
    """Run one training job (or an export); 0 on success, 1 on a reported failure,
    2 on bad arguments, 128+N when stopped by signal N."""
    enforce_offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = spec_from_args(args)
        if spec.adapters_dir is None and os.environ.get("UNDERSTUDY_ADAPTERS_DIR"):
            spec = spec.model_copy(update={"adapters_dir": Path(os.environ["UNDERSTUDY_ADAPTERS_DIR"])})
        route = validate_route(args.route)
        job_id = validate_job_id(args.job_id) if args.job_id else new_job_id()
    except (ValidationError, TrainerError) as exc:
        parser.error(str(exc))
    data_dir = args.data_dir or Path(os.environ.get("UNDERSTUDY_DATA_DIR", DEFAULT_DATA_DIR))
    # Imported here: it pulls in torch and transformers (seconds), which `--help` and the
    # gateway's CLI module must not pay for.
    from trainer.console import ConsoleProgress
    from trainer.runner import JobContext, export_samples, run_job

    if args.export:
        conversion = export_samples(spec, data_dir, route, args.export)
        print(f"wrote {len(conversion.samples)} pairs to {args.export} (skipped: {dict(conversion.skipped)})")
        return 0
    status_path = args.status_file or data_dir / "jobs" / f"{job_id}.json"
    context = JobContext(route=route, data_dir=data_dir, job_id=job_id, status_path=status_path)
    previous = _install_stop_handlers()
    console = ConsoleProgress(sys.stderr)
    try:
        status = run_job(context, spec, [console])
    except JobTerminated as exc:
        logging.getLogger("trainer").error("job %s %s", job_id, exc)
        return 128 + signal.Signals[exc.signal_name].value
    except TrainerError as exc:
        logging.getLogger("trainer").error("job %s failed: %s", job_id, exc)
        return 1
    finally:
        console.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"job {job_id}: {status.message}; adapter at {status.adapter_path}", file=sys.stderr)
    return 0
