"""Every admin action as an `understudy` verb, through the admin API like `routes` does:

    understudy route pin NAME cloud|local|auto      understudy route unpin NAME
    understudy route train NAME                     understudy route eval NAME
    understudy route rollback NAME [--version N]    understudy route adapters NAME
    understudy logs export [--route R ...] [-o F]   understudy logs delete [--route R] [--before T] [--retrain]
    understudy jobs show ID                         understudy jobs cancel ID
    understudy dataset import --route R FILE [--name N] [--train-only]
    understudy dataset list --route R               understudy dataset delete --route R ID

Each prints a small table, or with `--json` the admin API's answer as it came.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from gateway.admin_cli import AdminClient, AdminError, add_arguments, table

Action = Callable[[AdminClient, argparse.Namespace], tuple[Any, list[list[str]]]]
FIELD_VALUE = ("FIELD", "VALUE")


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _pairs(payload: dict[str, Any], keys: tuple[str, ...]) -> list[list[str]]:
    return [[key, _cell(payload.get(key))] for key in keys if key in payload]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


# --- route ----------------------------------------------------------------------------------

_ROUTE_KEYS = ("name", "mode", "serving", "pinned", "active_adapter", "candidate_adapter")


def _set_mode(client: AdminClient, name: str, mode: str) -> tuple[Any, list[list[str]]]:
    route = client.call("POST", f"/admin/routes/{_q(name)}/mode", {"mode": mode})
    return route, _pairs(route, _ROUTE_KEYS)


def route_pin(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    return _set_mode(client, args.name, args.mode)


def route_unpin(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    return _set_mode(client, args.name, "auto")


def route_train(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    accepted = client.call("POST", f"/admin/routes/{_q(args.name)}/train", {})
    hint = f"understudy jobs show {accepted['job_id']}"
    return accepted, [["job_id", accepted["job_id"]], ["follow with", hint]]


def route_eval(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    started = client.call("POST", f"/admin/routes/{_q(args.name)}/eval", {})
    return started, _pairs(started, ("adapter_version", "status"))


def route_adapters(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    adapters = client.get(f"/admin/routes/{_q(args.name)}/adapters")
    return adapters, [_adapter_row(adapter) for adapter in adapters["data"]]


def _adapter_row(adapter: dict[str, Any]) -> list[str]:
    meta = adapter.get("meta") or {}
    role = "active" if adapter.get("active") else "candidate" if adapter.get("candidate") else ""
    flags = " (trained on deleted data)" if meta.get("trained_on_deleted") else ""
    return [
        f"v{adapter['version']}",
        role + flags,
        _cell(meta.get("real_count", meta.get("sample_count"))),
        _cell(meta.get("synthetic_count", 0)),
        _cell(meta.get("imported_count", 0)),
        _cell(meta.get("steps_run")),
        _cell(meta.get("train_loss")),
        _cell(meta.get("created_at")),
    ]


def route_rollback(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    version = args.version or _previous_version(client, args.name)
    route = client.call("POST", f"/admin/routes/{_q(args.name)}/adapter", {"version": version})
    return route, _pairs(route, _ROUTE_KEYS)


def _previous_version(client: AdminClient, name: str) -> int:
    adapters = client.get(f"/admin/routes/{_q(name)}/adapters")["data"]
    active = next((a["version"] for a in adapters if a.get("active")), None)
    if active is None:
        raise AdminError(f"route {name!r} serves no adapter; give --version")
    older = [a["version"] for a in adapters if a["version"] < active]
    if not older:
        raise AdminError(f"route {name!r} has no adapter older than v{active}; give --version")
    return max(older)


# --- logs and jobs --------------------------------------------------------------------------


def logs_delete(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    if not args.route and not args.before:
        raise AdminError("give --route and/or --before: refusing to delete every record")
    query = {"route": args.route, "before": args.before, "retrain": "true" if args.retrain else None}
    result = client.call("DELETE", "/admin/logs?" + _query(query))
    derived = result.get("derived") or {}
    rows = [["records", str(result["deleted"])]]
    rows += [[key, _cell(value)] for key, value in derived.items()]
    rows += [[f"retrain {route}", job] for route, job in result.get("retrain_jobs", {}).items()]
    return result, rows


def _query(params: dict[str, str | None]) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})


def logs_export(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    query = {k: getattr(args, k) for k in ("route", "backend", "kind", "since", "until")}
    path = "/admin/logs/export?" + _query(query)
    if args.output in (None, "-"):
        out.flush()
        copied = client.stream(path, getattr(out, "buffer", sys.stdout.buffer))
    else:
        with Path(args.output).open("wb") as target:
            copied = client.stream(path, target)
        print(f"wrote {copied:,} bytes to {args.output}", file=sys.stderr)
    return 0


_JOB_KEYS = (
    "job_id",
    "route",
    "status",
    "message",
    "current_step",
    "total_steps",
    "current_epoch",
    "total_epochs",
    "loss",
    "adapter_path",
)


def jobs_show(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    job = client.get(f"/admin/jobs/{_q(args.job_id)}")
    return job, _pairs(job, _JOB_KEYS)


def jobs_cancel(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    job = client.call("POST", f"/admin/jobs/{_q(args.job_id)}/cancel", {})
    return job, _pairs(job, _JOB_KEYS)


# --- datasets -------------------------------------------------------------------------------

_IMPORT_KEYS = ("id", "route", "name", "pairs", "heldout")


def dataset_import(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise AdminError(f"cannot read {args.file}: {exc.strerror}") from None
    query = {"name": args.name or Path(args.file).name, "heldout": "false" if args.train_only else None}
    status, answer = client.upload(f"/admin/routes/{_q(args.route)}/dataset?" + _query(query), data)
    if status >= 400:
        lines = [f"line {e['line']}: {e['error']}" for e in answer.get("errors", [])]
        message = (answer.get("error") or {}).get("message", f"HTTP {status}")
        raise AdminError("\n".join([message, *lines]))
    return answer, _pairs(answer, _IMPORT_KEYS)


def dataset_list(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    found = client.get(f"/admin/routes/{_q(args.route)}/datasets")
    return found, [[_cell(d.get(k)) for k in ("id", "name", "pairs", "heldout")] for d in found["data"]]


def dataset_delete(client: AdminClient, args: argparse.Namespace) -> tuple[Any, list[list[str]]]:
    result = client.call("DELETE", f"/admin/routes/{_q(args.route)}/datasets/{_q(args.import_id)}")
    return result, _pairs(result, ("id", "deleted"))


ACTIONS: dict[tuple[str, str], Action] = {
    ("dataset", "import"): dataset_import,
    ("dataset", "list"): dataset_list,
    ("dataset", "delete"): dataset_delete,
    ("route", "pin"): route_pin,
    ("route", "unpin"): route_unpin,
    ("route", "train"): route_train,
    ("route", "eval"): route_eval,
    ("route", "rollback"): route_rollback,
    ("route", "adapters"): route_adapters,
    ("logs", "delete"): logs_delete,
    ("jobs", "show"): jobs_show,
    ("jobs", "cancel"): jobs_cancel,
}
HEADERS = {
    ("route", "adapters"): (
        "VERSION",
        "ROLE",
        "REAL",
        "SYNTHETIC",
        "IMPORTED",
        "STEPS",
        "TRAIN LOSS",
        "CREATED",
    ),
    ("dataset", "list"): ("ID", "NAME", "PAIRS", "HELD OUT"),
}


# --- parsing and running --------------------------------------------------------------------


def add_parsers(commands: Any) -> None:
    """The `route`, `logs` and `jobs` commands, on `understudy`'s subparsers."""
    route = commands.add_parser("route", help="act on a route: pin, unpin, train, eval, rollback, adapters")
    verbs = route.add_subparsers(dest="verb", required=True)
    pin = _verb(verbs, "pin", "serve the route from cloud or local, or leave it to the policy (auto)")
    pin.add_argument("mode", choices=["cloud", "local", "auto"])
    _verb(verbs, "unpin", "leave the route to the policy again (auto)")
    _verb(verbs, "train", "start a training job now")
    _verb(verbs, "eval", "re-run the held-out evaluation of the candidate (or serving) adapter")
    rollback = _verb(verbs, "rollback", "serve another adapter version (default: the one before)")
    rollback.add_argument("--version", type=int, help="the version to serve")
    _verb(verbs, "adapters", "the route's adapter versions")

    logs = commands.add_parser("logs", help="export or delete logged requests")
    log_verbs = logs.add_subparsers(dest="verb", required=True)
    export = log_verbs.add_parser("export", help="matching records as JSONL, oldest first")
    for option in ("route", "backend", "kind", "since", "until"):
        export.add_argument(f"--{option}")
    export.add_argument("-o", "--output", help="file to write (default: stdout)")
    add_arguments(export)
    delete = log_verbs.add_parser("delete", help="privacy deletion, derived data included")
    delete.add_argument("--route")
    delete.add_argument("--before", help="ISO 8601: delete records strictly before")
    delete.add_argument("--retrain", action="store_true", help="retrain adapters trained on deleted pairs")
    add_arguments(delete)

    dataset = commands.add_parser("dataset", help="seed a route from OpenAI fine-tuning JSONL")
    dataset_verbs = dataset.add_subparsers(dest="verb", required=True)
    upload = dataset_verbs.add_parser("import", help="import a JSONL file (every bad line is reported)")
    upload.add_argument("file", metavar="FILE")
    upload.add_argument("--name", help="a label (default: the file's name)")
    upload.add_argument("--train-only", action="store_true", help="never hold these pairs out for the judge")
    listing = dataset_verbs.add_parser("list", help="the route's imports")
    remove = dataset_verbs.add_parser("delete", help="delete an import")
    remove.add_argument("import_id", metavar="ID")
    for parser in (upload, listing, remove):
        parser.add_argument("--route", required=True)
        add_arguments(parser)

    jobs = commands.add_parser("jobs", help="training jobs: show or cancel")
    job_verbs = jobs.add_subparsers(dest="verb", required=True)
    for name, text in (("show", "a job's status"), ("cancel", "stop a running job")):
        job = job_verbs.add_parser(name, help=text)
        job.add_argument("job_id", metavar="ID")
        add_arguments(job)


def _verb(verbs: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = verbs.add_parser(name, help=text)
    parser.add_argument("name", metavar="NAME", help="the route")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one verb; 0 on success, 1 when the gateway refused or cannot be asked."""
    out = out or sys.stdout
    client = AdminClient(args.url, args.admin_key)
    key = (args.command, args.verb)
    try:
        if key == ("logs", "export"):
            return logs_export(client, args, out)
        payload, rows = ACTIONS[key](client, args)
    except AdminError as exc:
        print(f"understudy {' '.join(key)}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2), file=out)
    else:
        print(table(rows, HEADERS.get(key, FIELD_VALUE)), file=out)
    return 0
