"""`python -m local_backend` / `understudy backend`: maps options onto Settings and serves.

Exit status: 0 after a clean shutdown, 1 when the model cannot be loaded, 2 on bad options.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from local_backend.loading import DEFAULT_MODEL, MissingDependencyError, require_torchao
from local_backend.settings import Settings
from trainer.offline import enforce_offline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m local_backend",
        description="OpenAI-compatible server for the local model, with LoRA adapters hot-swapped per request.",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="bundled name, GGUF file, local folder or hub id"
    )
    parser.add_argument("--served-model-name", default=None, help="name clients use for the base model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="model cache and outlines cache live here (default: $UNDERSTUDY_DATA_DIR or ./.understudy)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA adapter to load at startup (repeatable)",
    )
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences generated together")
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 on CUDA or a CPU with native bf16 (AVX512-bf16, AMX), else float32",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["auto", "none", "int8", "int4"],
        help="int8: weight-only int8 decoder linear layers; int4: weight-only int4 (per group, CPU) "
        "for every linear layer, the head included; both through torchao (LoRA adapters keep their dtype)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--default-max-tokens", type=int, default=None)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    data_dir = args.data_dir or Path(os.environ.get("UNDERSTUDY_DATA_DIR") or ".understudy")
    return Settings(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        data_dir=data_dir,
        loras=_parse_loras(args.lora, parser),
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        threads=args.threads,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        log_level=args.log_level,
    )


def _parse_loras(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    loras: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            parser.error(f"--lora expects NAME=PATH, got {item!r}")
        loras[name.strip()] = Path(path.strip()).expanduser()
    return loras


def prepare_environment(settings: Settings) -> None:
    """Process-wide defaults the model stack reads: offline hub, no torch.compile (the
    outlines mask kernel would otherwise compile for up to half a minute), caches in the data dir."""
    enforce_offline()
    os.environ.setdefault("OUTLINES_CACHE_DIR", str(settings.outlines_cache_dir))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.data_dir / "cache" / "torchinductor"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, parser)
    except ValueError as exc:  # pydantic's ValidationError names the offending option
        parser.error(str(exc))
    if settings.quantize in ("int8", "int4"):  # auto does without
        try:
            require_torchao(settings.quantize)
        except MissingDependencyError as exc:
            parser.error(str(exc))
    prepare_environment(settings)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(settings)


def serve(settings: Settings) -> int:
    """Run the server until shutdown; 1 if the model failed to load."""
    import uvicorn
    from transformers.utils import logging as transformers_logging

    from local_backend.server import create_app

    # Loading an adapter makes transformers print a report listing the other adapters' keys as "missing".
    transformers_logging.set_verbosity_error()
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    return 1 if failed else 0
