"""Several replicas: two Understudy gateways on one PostgreSQL, side by side with one on SQLite.

    .venv/bin/python bench/replicas.py [--requests 2000] [--rounds 3] [--concurrency 1 32]
                                       [--propagations 20] [--store-records 20480] [--skip-litellm]

Processes: the fake upstream (`gateway.demo.fakecloud`), a throwaway PostgreSQL cluster (initdb
in a temp dir, a free port, its default durability: fsync on, synchronous_commit on), one
`understudy serve` on SQLite and two on the PostgreSQL, all with the same config (request
logging on, one adaptive route for the pins, the local backend pointed at the fake upstream and
never asked); the load generator (`bench/loadgen.py`) is a fresh process per cell, and for the
pair it sends the requests to the two replicas in turn. Cells are interleaved (direct, SQLite,
pair, direct, ...) and every figure is the median over rounds; added latency is taken against
direct within the same round first. Then:
- records/s each store sustains through the log writer (group commit, 256 records finishing
  together), and with one commit per record, as bench/store_throughput.py measures them, on
  this run's SQLite file system and this run's PostgreSQL (there also with synchronous_commit
  off, to show what the WAL flush costs);
- how long a pin set through one replica's admin API takes to show on the other (it polls the
  route versions every second), alternating which replica sets it;
- LiteLLM's proxy on the same PostgreSQL, where it can start here offline (else its error).
Results: bench/results/replicas.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm_proxy
import orjson
import psycopg
from harness import RESULTS, Service, Services, free_port, tree_rss_mib
from proxy_compare import API_KEY, cpu_seconds, run_loadgen, start_fakecloud, summarise, understudy_command
from store_throughput import one_per_commit, through_writer

from gateway.store import open_store
from gateway.store.base import RecordFilter

ROUTE = "bench"


@dataclass
class Target:
    """One gateway, or several replicas behind the loadgen's round robin."""

    name: str
    urls: list[str]
    services: list[Service]

    def cpu(self) -> float:
        return sum(cpu_seconds(service.pid) for service in self.services)


# --- PostgreSQL ----------------------------------------------------------------------------


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None
    )
    if found is None:
        raise SystemExit(f"{name} not found: apt-get install postgresql")
    return found


@contextlib.contextmanager
def postgres(services: Services, log_dir: Path) -> Iterator[str]:
    """A fresh cluster on a free port; yields the URL of its `understudy` database. As root the
    server runs as the `postgres` user (it refuses root)."""
    as_user: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    if os.geteuid() == 0:
        import pwd

        account = pwd.getpwnam("postgres")
        os.chown(workdir, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = workdir / "data"
    try:
        init = [*as_user, _postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        subprocess.run(init, check=True, capture_output=True)
        port = free_port()
        command = [*as_user, _postgres_bin("postgres"), "-D", str(data), "-p", str(port)]
        command += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        services.start("postgres", command, log_dir / "postgres.log")
        server = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(server, autocommit=True) as admin:
                    admin.execute("CREATE DATABASE understudy")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server.rsplit("/", 1)[0] + "/understudy"
    finally:
        stop = [*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


# --- gateways ------------------------------------------------------------------------------


def start_gateway(services: Services, workdir: Path, name: str, upstream: str, database_url: str) -> Service:
    port = free_port()
    config = {
        "data_dir": str(workdir / name),
        "database_url": database_url,
        "upstream": {"base_url": f"{upstream}/v1"},
        # An adaptive route needs a local backend; this one is never asked (no traffic matches).
        "local": {"enabled": True, "base_url": f"{upstream}/v1"},
        "routes": [{"name": ROUTE, "match": [f"{ROUTE}-*"], "adapt": True}],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    env = {key: value for key, value in os.environ.items() if not key.startswith("UNDERSTUDY_")}
    service = services.start(
        name, understudy_command(path, port), workdir / f"{name}.log", env=env, cwd=workdir
    )
    service.wait_http(f"http://127.0.0.1:{port}/healthz")
    return service


def url_of(service: Service) -> str:
    return f"http://127.0.0.1:{service.command[service.command.index('--port') + 1]}"


# --- measurements --------------------------------------------------------------------------


def latency(targets: list[Target], args: argparse.Namespace) -> dict[str, Any]:
    """Added p50/p99 over direct, non-streamed chat, per concurrency, medians over rounds."""
    warmups: dict[str, dict[str, Any]] = {}
    for target in targets:  # warm-up: connections, caches, the store's first pages
        warmups[target.name] = run_loadgen(target.urls, 200, 8, False)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        t.name: {str(c): [] for c in args.concurrency} for t in targets
    }
    for round_index in range(args.rounds):
        for concurrency in args.concurrency:
            for target in targets:
                before = target.cpu()
                cell = run_loadgen(target.urls, max(args.requests, 3 * concurrency), concurrency, False)
                cell["cpu_ms_per_request"] = (target.cpu() - before) * 1000 / (cell["ok"] + cell["warmup"])
                raw[target.name][str(concurrency)].append(cell)
        print(f"replicas: latency round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    summary = {
        name: {
            c: summarise(cells, None if name == "direct" else raw["direct"][c]) for c, cells in by_c.items()
        }
        for name, by_c in raw.items()
    }
    return {"summary": summary, "raw": raw, "warmup": warmups}


def answers_sent(latency: dict[str, Any], name: str) -> int:
    """Answers a target gave in the latency runs, warm-ups included."""
    cells = [latency["warmup"][name], *(cell for cells in latency["raw"][name].values() for cell in cells)]
    return sum(cell["ok"] + cell["warmup"] for cell in cells)


def stored_records(url: str) -> int:
    store = open_store(url)
    try:
        return store.count_records(RecordFilter(kind="user"))
    finally:
        store.close()


def store_throughput(urls: dict[str, str], records: int) -> dict[str, dict[str, float]]:
    """Records/s through the log writer (group commit), and with one commit per record (what
    a lone request waits for), into a fresh table of each store."""
    return {
        name: {
            "group_commit": asyncio.run(through_writer(url, records)),
            "one_commit_each": one_per_commit(url, 2_000),
        }
        for name, url in urls.items()
    }


def without_wal_wait(url: str) -> float:
    """One commit each with synchronous_commit off: what a commit costs besides waiting for
    its WAL flush (not a setting to run with: a server crash could lose acknowledged records)."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET synchronous_commit = off")
        admin.execute("SELECT pg_reload_conf()")
    try:
        return one_per_commit(url, 2_000)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM RESET synchronous_commit")
            admin.execute("SELECT pg_reload_conf()")


def _admin(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # loopback: no admin key needed
        return orjson.loads(response.read())


def pin_propagation(urls: list[str], count: int) -> dict[str, Any]:
    """Seconds from a pin's answer on one replica until the other shows it (polled every 5 ms)."""
    seen: list[float] = []
    for n in range(count):
        setter, other = urls[n % 2], urls[(n + 1) % 2]
        mode = "cloud" if n % 2 == 0 else "auto"
        pinned = None if mode == "auto" else mode
        _admin(setter, f"/admin/routes/{ROUTE}/mode", {"mode": mode})
        answered = time.perf_counter()
        while _admin(other, f"/admin/routes/{ROUTE}")["pinned"] != pinned:
            if time.perf_counter() - answered > 30:
                raise RuntimeError("a pin was not seen by the other replica within 30 s")
            time.sleep(0.005)
        seen.append(time.perf_counter() - answered)
    ordered = sorted(seen)
    return {
        "count": count,
        "mean_s": statistics.mean(seen),
        "median_s": statistics.median(seen),
        "p90_s": ordered[int(0.9 * (len(ordered) - 1))],
        "max_s": ordered[-1],
        "raw_s": seen,
    }


def litellm_on_postgres(
    services: Services, workdir: Path, upstream: str, database_url: str
) -> tuple[dict[str, Any], Service | None]:
    """Whether LiteLLM's proxy starts on the PostgreSQL here, offline (then the running proxy),
    and its error if not."""
    try:
        version = litellm_proxy.ensure_venv(RESULTS / "litellm-install.log")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"ran": False, "error": f"its venv could not be made: {exc}"}, None
    try:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE litellm")
        own = database_url.rsplit("/", 1)[0] + "/litellm"
        service = litellm_proxy.start(services, workdir, f"{upstream}/v1", free_port(), API_KEY, own, 120)
    except RuntimeError as exc:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # its log colours the error
        lines = [line for line in plain.splitlines() if line.strip()]
        errors = [line for line in lines if "rror" in line or "prisma" in line.lower()]
        return {
            "ran": False,
            "version": version,
            "error": (errors or lines)[-1][:500],
            "log_tail": lines[-15:],
        }, None
    return {"ran": True, "version": version}, service


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'conc':>5} {'target':>10} {'p50 ms':>8} {'p99 ms':>8} {'+p50':>7} {'+p99':>7} {'req/s':>7} {'cpu ms':>7}"
    ]
    for name, by_c in result["latency"]["summary"].items():
        for c, s in by_c.items():
            added = [s.get("added_p50_ms"), s.get("added_p99_ms")]
            cells = [f"{v:7.2f}" if v is not None else f"{'-':>7}" for v in added]
            lines.append(
                f"{c:>5} {name:>10} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {cells[0]} {cells[1]} "
                f"{s['rps']:7.0f} {s['cpu_ms_per_request']:7.2f}"
            )
    for name, rates in result["store_records_per_s"].items():
        line = f"store {name}: {rates['group_commit']:,.0f} records/s through the log writer, "
        line += f"{rates['one_commit_each']:,.0f} with one commit each"
        if "one_commit_each_no_wal_wait" in rates:
            line += f" ({rates['one_commit_each_no_wal_wait']:,.0f} without waiting for the WAL flush)"
        lines.append(line)
    pins = result["pin_propagation"]
    lines.append(
        f"pin seen by the other replica: mean {pins['mean_s']:.3f} s, median {pins['median_s']:.3f} s,"
        f" max {pins['max_s']:.3f} s"
    )
    litellm = result["litellm_postgres"]
    lines.append(f"LiteLLM on PostgreSQL: {'ran' if litellm['ran'] else 'not run: ' + litellm['error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--propagations", type=int, default=20, help="pins timed")
    parser.add_argument("--store-records", type=int, default=20_480, help="per store, through the writer")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, Services() as services:
        workdir = Path(tmp)
        upstream, upstream_url = start_fakecloud(services, workdir)
        with postgres(services, workdir) as pg_url:
            targets = [Target("direct", [upstream_url], [upstream])]
            result["litellm_postgres"], litellm = {"ran": False, "error": "skipped (--skip-litellm)"}, None
            if not args.skip_litellm:
                result["litellm_postgres"], litellm = litellm_on_postgres(
                    services, workdir, upstream_url, pg_url
                )
            sqlite_url = f"sqlite:///{workdir / 'sqlite.db'}"
            single = start_gateway(services, workdir, "sqlite", upstream_url, sqlite_url)
            pair = [start_gateway(services, workdir, name, upstream_url, pg_url) for name in ("pg-a", "pg-b")]
            targets += [
                Target("sqlite", [url_of(single)], [single]),
                Target("pg-pair", [url_of(s) for s in pair], pair),
            ]
            if litellm is not None:
                targets.append(Target("litellm-pg", [url_of(litellm)], [litellm]))
            result["latency"] = latency(targets, args)
            result["memory_mib"] = {t.name: [tree_rss_mib(s.pid) for s in t.services] for t in targets[1:]}
            result["records"] = {
                "answers_sent": {t.name: answers_sent(result["latency"], t.name) for t in targets[1:3]},
                "stored": {"sqlite": stored_records(sqlite_url), "pg-pair": stored_records(pg_url)},
            }
            result["pin_propagation"] = pin_propagation(targets[2].urls, args.propagations)
            for service in [single, *pair]:  # the throughput runs measure the stores alone
                service.stop()
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("CREATE DATABASE throughput")
            throughput_urls = {
                "sqlite": f"sqlite:///{workdir / 'throughput.db'}",
                "postgres": pg_url.rsplit("/", 1)[0] + "/throughput",
            }
            result["store_records_per_s"] = store_throughput(throughput_urls, args.store_records)
            result["store_records_per_s"]["postgres"]["one_commit_each_no_wal_wait"] = without_wal_wait(
                throughput_urls["postgres"]
            )
    result["settings"] = {
        **{key: value for key, value in vars(args).items() if key != "out"},
        "load_average_after": os.getloadavg(),
        "command": " ".join([".venv/bin/python", "bench/replicas.py", *sys.argv[1:]]),
    }
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
