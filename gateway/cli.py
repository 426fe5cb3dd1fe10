"""`understudy`: the command line. It maps options onto the settings object and calls the
factories; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import admin_cli, admin_verbs, extras
from gateway.settings import ConfigError, Settings, load_settings
from trainer.offline import enforce_offline

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = extras.fit_to_install(load_settings(args.config, host=args.host, port=args.port))
    except ConfigError as exc:
        print(f"understudy: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(server_config(settings, args.log_level)).run()
    return 0


def server_config(settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `understudy serve`: the app, and the connection guard in front
    of it (timeouts, connection cap; see gateway.web.connections)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.web.connections import (
        ConnectionBook,
        ConnectionLimits,
        default_max_connections,
        guarded_protocol,
        raise_fd_limit,
    )

    server = settings.server
    fd_limit = raise_fd_limit()
    limits = ConnectionLimits(
        header_timeout_s=server.header_timeout_s,
        body_timeout_s=server.body_timeout_s,
        max_header_bytes=server.max_header_bytes,
        max_connections=server.max_connections or default_max_connections(fd_limit),
    )
    log.info("file descriptors: %d; client connections at most %d", fd_limit, limits.max_connections)
    return uvicorn.Config(
        create_app(settings, freeze_gc=True),
        host=settings.host,
        port=settings.port,
        loop="auto",
        http=guarded_protocol(ConnectionBook(limits)),
        timeout_keep_alive=server.keep_alive_timeout_s,
        h11_max_incomplete_event_size=server.max_header_bytes,
        log_level=log_level,
        access_log=False,
        # X-Forwarded-For is not trusted by default: the client address gates the admin API.
        proxy_headers=False,
        timeout_graceful_shutdown=30,
    )


def _needs(extra: str, what: str) -> bool:
    """False, with the one line naming the extra, when this install cannot run `what`."""
    try:
        extras.require(extra, what)
    except ConfigError as exc:
        print(f"understudy: {exc}", file=sys.stderr)
        return False
    return True


def _backend(argv: list[str]) -> int:
    if not _needs("local", "understudy backend"):
        return 2
    from local_backend.cli import main as backend_main

    return backend_main(argv)


def _train(argv: list[str]) -> int:
    if not _needs("train", "understudy train"):
        return 2
    from trainer.cli import main as trainer_main

    return trainer_main(argv)


def _demo(args: argparse.Namespace) -> int:
    if not _needs("demo", "understudy demo"):
        return 2
    from gateway.demo.run import run_demo

    logging.basicConfig(level=logging.WARNING)
    root = args.data_dir or os.environ.get("UNDERSTUDY_DATA_DIR") or ".understudy"
    return run_demo(Path(root), keep=args.keep)


def _import_litellm(args: argparse.Namespace) -> int:
    from gateway.litellm_import import convert_file

    output = Path(args.output)
    if args.output != "-" and output.exists() and not args.force:
        print(f"understudy: {output} exists (--force to overwrite, -o - for stdout)", file=sys.stderr)
        return 2
    try:
        text, report = convert_file(Path(args.source))
    except ConfigError as exc:
        print(f"understudy: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    for line in report.lines():
        print(line, file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="understudy", description="A learning OpenAI-API gateway.")
    parser.add_argument("--version", action="version", version=f"understudy {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway (and its local backend)")
    serve.add_argument("--config", help="gateway.yaml path (default: $UNDERSTUDY_CONFIG or ./gateway.yaml)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    demo = commands.add_parser("demo", help="offline showcase: watch a route learn and go local")
    demo.add_argument("--data-dir", help="where the demo works (default $UNDERSTUDY_DATA_DIR or .understudy)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's logs and adapters afterwards")
    migrate = commands.add_parser(
        "import-litellm", help="write a gateway.yaml equivalent to a LiteLLM proxy config.yaml"
    )
    migrate.add_argument("source", help="LiteLLM's config.yaml (model_list, litellm_settings, ...)")
    migrate.add_argument("-o", "--output", default="gateway.yaml", help="where to write (- for stdout)")
    migrate.add_argument("--force", action="store_true", help="overwrite the output file")
    commands.add_parser(
        "backend", help="run the local model server (see: understudy backend --help)", add_help=False
    )
    commands.add_parser(
        "train", help="train a route's adapter (see: understudy train --help)", add_help=False
    )
    admin_cli.add_arguments(commands.add_parser("routes", help="a running gateway's routes, as a table"))
    admin_cli.add_arguments(commands.add_parser("status", help="a running gateway's health, totals, routes"))
    admin_verbs.add_parsers(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("understudy")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    enforce_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    # backend/train own their options: hand them the rest of the line untouched.
    if argv and argv[0] in ("backend", "train"):
        return (_backend if argv[0] == "backend" else _train)(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "import-litellm":
        return _import_litellm(args)
    if args.command in ("routes", "status"):
        return admin_cli.run(args.command, args)
    if args.command in ("route", "logs", "jobs", "dataset"):
        return admin_verbs.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
