"""`understudy routes` and `understudy status`: the admin API as a table in a terminal.

Both read a running gateway over HTTP (`--url`, default http://127.0.0.1:8000) with the admin
key (`--admin-key`, default $UNDERSTUDY_ADMIN_KEY); nothing here touches the data dir.
`routes` prints one line per route: mode, who serves, traffic share cloud/local/failover
(all logged user requests), rolling judge score against the threshold, adapter and training
progress. `status` adds the gateway's health and recent totals above the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, TextIO

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 15.0
COLUMNS = ("ROUTE", "MODE", "SERVING", "TRAFFIC cloud/local/failover", "SCORE/THRESHOLD", "ADAPTER", "JOB")


class AdminError(Exception):
    """The gateway refused (wrong key, unknown route...) or could not be asked."""


class Unreachable(AdminError):
    """Nothing answers at the URL."""


class AdminClient:
    def __init__(self, url: str, admin_key: str | None):
        self.url = url.rstrip("/")
        self.admin_key = admin_key

    def get(self, path: str, *, auth: bool = True) -> Any:
        return self.call("GET", path, auth=auth)

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        """One admin API call; its JSON answer."""
        with self._open(method, path, body, auth=auth) as response:
            return json.loads(response.read())

    def upload(self, path: str, data: bytes) -> tuple[int, Any]:
        """POST a file as it is; (status, JSON answer), a 4xx answer included (its body
        may list what was wrong, line by line)."""
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        request.add_header("content-type", "application/x-ndjson")
        if self.admin_key:
            request.add_header("authorization", f"Bearer {self.admin_key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                return exc.code, json.loads(exc.read() or b"{}")
            raise AdminError(f"{path}: {exc.code} {_error_message(exc)}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise Unreachable(
                f"cannot reach the gateway at {self.url} ({getattr(exc, 'reason', exc)})"
            ) from None

    def stream(self, path: str, out: BinaryIO) -> int:
        """Copy a streamed answer (an export) to `out` as it comes; bytes copied."""
        copied = 0
        with self._open("GET", path, None) as response:
            while chunk := response.read(65536):
                out.write(chunk)
                copied += len(chunk)
        return copied

    @contextlib.contextmanager
    def _open(self, method: str, path: str, body: Any, *, auth: bool = True) -> Iterator[Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"accept": "application/json"}
        if data is not None:
            headers["content-type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        if auth and self.admin_key:
            request.add_header("authorization", f"Bearer {self.admin_key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                yield response
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{path}: {exc.code} {_error_message(exc)}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the gateway at {self.url} ({reason})") from None

    def route_details(self) -> list[dict[str, Any]]:
        names = [route["name"] for route in self.get("/admin/routes")["data"]]
        return [self.get("/admin/routes/" + urllib.parse.quote(name, safe="")) for name in names]


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)


# --- cells --------------------------------------------------------------------------------


def traffic_cell(traffic: dict[str, int]) -> str:
    total = sum(traffic.get(key, 0) for key in ("cloud", "local", "failover"))
    if not total:
        return "- (0 requests)"
    shares = " / ".join(
        f"{round(100 * traffic.get(key, 0) / total)}%" for key in ("cloud", "local", "failover")
    )
    return f"{shares} ({total:,})"


def score_cell(route: dict[str, Any]) -> str:
    score = route.get("rolling_score")
    policy = route["policy"]
    threshold = policy.get("min_rolling_score") or policy["threshold"]
    return f"{'-' if score is None else f'{score:.1f}'} / {threshold:g}"


def adapter_cell(route: dict[str, Any]) -> str:
    active, candidate = route.get("active_adapter"), route.get("candidate_adapter")
    parts = [f"v{active}"] if active is not None else []
    if candidate is not None:
        parts.append(f"candidate v{candidate}")
    return ", ".join(parts) or "-"


def job_cell(job: dict[str, Any] | None) -> str:
    if not job:
        return "-"
    status = str(job.get("status"))
    if status not in ("queued", "training"):
        return status
    step, total = job.get("current_step") or 0, job.get("total_steps") or 0
    progress = f" {step}/{total} ({round(100 * step / total)}%)" if total else ""
    loss = f" loss {job['loss']:.3f}" if isinstance(job.get("loss"), int | float) else ""
    return f"{status}{progress}{loss}"


def route_row(route: dict[str, Any]) -> list[str]:
    serving = route["serving"] + (" (pinned)" if route.get("pinned") else "")
    mode = route["mode"] if route.get("adapt") else "cloud (no adapt)"
    return [
        route["name"],
        mode,
        serving,
        traffic_cell(route.get("traffic", {})),
        score_cell(route) if route.get("adapt") else "-",
        adapter_cell(route),
        job_cell(route.get("job")),
    ]


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        for line in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


# --- commands -------------------------------------------------------------------------------


def print_routes(client: AdminClient, out: TextIO) -> None:
    print(table([route_row(route) for route in client.route_details()]), file=out)


def _money(value: float) -> str:
    return f"${value:.2f}" if value >= 1 else f"${value:.6f}".rstrip("0").rstrip(".") if value else "$0"


def status_lines(client: AdminClient) -> list[str]:
    ready = _readiness(client)
    dashboard = client.get("/admin/dashboard")
    backend = dashboard.get("local_backend") or "off"
    recent = {"requests": 0, "local": 0}
    spend = saved = 0.0
    for route in dashboard["routes"]:
        for point in route["series"]:
            if point["t"] >= dashboard["generated_at"] - 60:
                recent["requests"] += point["cloud"] + point["local"] + point["failover"]
                recent["local"] += point["local"] + point["failover"]
        spend += route["totals"]["cost_usd"]
        saved += route["totals"]["cost_saved_usd"]
    uptime = max(1.0, min(60.0, dashboard["generated_at"] - dashboard["started_at"]))
    local_share = f"{round(100 * recent['local'] / recent['requests'])}%" if recent["requests"] else "-"
    return [
        f"Understudy at {client.url}: {ready}, local backend {backend}",
        f"last minute: {recent['requests'] / uptime:.2f} requests/s, {local_share} served locally",
        f"all time: {_money(spend)} cloud spend, {_money(saved)} saved by local answers",
    ]


def _readiness(client: AdminClient) -> str:
    try:
        return str(client.get("/readyz", auth=False).get("status", "unknown"))
    except Unreachable:
        raise
    except AdminError:
        return "not ready"  # /readyz answers 503 while starting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("UNDERSTUDY_ADMIN_KEY"),
        help="admin key (default $UNDERSTUDY_ADMIN_KEY; not needed on loopback when none is configured)",
    )
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")


def run(command: str, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `routes` or `status`; 0 on success, 1 when the gateway cannot be asked."""
    out = out or sys.stdout
    client = AdminClient(args.url, args.admin_key)
    try:
        if args.json:
            payload = client.route_details() if command == "routes" else client.get("/admin/dashboard")
            print(json.dumps(payload, indent=2), file=out)
        elif command == "routes":
            print_routes(client, out)
        else:
            print("\n".join(status_lines(client)) + "\n", file=out)
            print_routes(client, out)
    except AdminError as exc:
        print(f"understudy {command}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="understudy", description="Read a running gateway's admin API.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("routes", "the routes and their state, as a table"),
        ("status", "health, totals and routes"),
    ):
        add_arguments(commands.add_parser(name, help=text))
    args = parser.parse_args(argv)
    return run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
