"""Proxy comparison: Understudy vs LiteLLM's proxy vs direct, one fake upstream for all three.

    .venv/bin/python bench/proxy_compare.py [--requests 2000] [--litellm-requests 300] [--rounds 3]
                                            [--concurrency 1 8 32 128] [--skip-litellm]

Processes: the fake upstream (`gateway.demo.fakecloud`), Understudy (`understudy serve`, local
backend off, request logging on into SQLite in a temp data dir, its default log level), LiteLLM's
proxy (`litellm --config`, its own venv, no database, default logging/callbacks), one worker
each; the load generator (`bench/loadgen.py`) is a fresh process per cell. The same chat
request goes to each target, non-streamed and streamed, at each concurrency. Cells are
interleaved target by target (direct, understudy, litellm, direct, ...) and every figure is the
median over rounds; added latency is taken against direct within the same round first.
Reported per cell: latency p50/p99, requests/s, time to first token (streams), and the CPU time
the target's process tree spent per request; per target: RSS after warm-up and peak RSS (sum of
VmHWM over the process tree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm_proxy
import psutil
from harness import REPO, RESULTS, Service, Services, free_port, tree_rss_mib

LOADGEN = REPO / "bench" / "loadgen.py"
MODES = ("chat", "stream")
# Every target gets the same Bearer key: LiteLLM checks it as its master key, Understudy (no
# upstream key configured) forwards it, the fake upstream ignores it.
API_KEY = "sk-bench-4f0c2a9e7d1b6c3a8e5f0d2b7a9c1e4f"


@dataclass
class Target:
    name: str
    url: str
    service: Service
    requests: int
    min_waves: int = 3

    def count(self, concurrency: int) -> int:
        # At least a few waves of the concurrency, so a p99 means something.
        return max(self.requests, self.min_waves * concurrency)


def start_fakecloud(services: Services, workdir: Path) -> tuple[Service, str]:
    port = free_port()
    command = [sys.executable, "-m", "gateway.demo.fakecloud", "--port", str(port)]
    service = services.start("fakecloud", command, workdir / "fakecloud.log", cwd=REPO)
    service.wait_http(f"http://127.0.0.1:{port}/v1/models")
    return service, f"http://127.0.0.1:{port}"


def understudy_command(config: Path, port: int) -> list[str]:
    understudy = Path(sys.executable).parent / "understudy"
    if understudy.exists():
        return [str(understudy), "serve", "--config", str(config), "--port", str(port)]
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]


def start_understudy(services: Services, workdir: Path, upstream: str) -> tuple[Service, str]:
    port = free_port()
    config = workdir / "gateway.yaml"
    config.write_text(
        f"upstream:\n  base_url: {upstream}/v1\nlocal:\n  enabled: false\ndata_dir: {workdir / 'understudy-data'}\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("UNDERSTUDY_")}
    service = services.start(
        "understudy", understudy_command(config, port), workdir / "understudy.log", env=env, cwd=workdir
    )
    service.wait_http(f"http://127.0.0.1:{port}/readyz")
    return service, f"http://127.0.0.1:{port}"


def run_loadgen(url: str | list[str], requests: int, concurrency: int, stream: bool) -> dict[str, Any]:
    """One loadgen run; several URLs (replicas) take the requests in turn."""
    urls = [url] if isinstance(url, str) else url
    command = [sys.executable, str(LOADGEN), "--url", *urls, "--requests", str(requests)]
    command += ["--concurrency", str(concurrency), "--api-key", API_KEY]
    if stream:
        command.append("--stream")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed on {url}:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def cpu_seconds(pid: int) -> float:
    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return total


def run_cell(target: Target, concurrency: int, mode: str) -> dict[str, Any]:
    cpu_before = cpu_seconds(target.service.pid)
    result = run_loadgen(target.url, target.count(concurrency), concurrency, mode == "stream")
    spent = cpu_seconds(target.service.pid) - cpu_before
    # The loadgen's warm-up requests ran inside the same window; count them too.
    served = result["ok"] + result["warmup"]
    result["cpu_ms_per_request"] = spent * 1000 / max(1, served)
    return result


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and v == v]
    return statistics.median(present) if present else None


def summarise(rounds: list[dict[str, Any]], direct: list[dict[str, Any]] | None) -> dict[str, Any]:
    keys = ("p50_ms", "p99_ms", "rps", "ttft_p50_ms", "ttft_p99_ms", "cpu_ms_per_request")
    summary: dict[str, Any] = {key: median([r.get(key) for r in rounds]) for key in keys}
    summary["requests"] = rounds[0]["requests"]
    summary["errors"] = sum(sum(r["errors"].values()) for r in rounds)
    if direct is not None:
        for key in ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
            diffs = [
                r[key] - d[key]
                for r, d in zip(rounds, direct, strict=True)
                if r.get(key) is not None and d.get(key) is not None
            ]
            summary["added_" + key] = median(list(diffs))
    return summary


def measure(targets: list[Target], args: argparse.Namespace) -> dict[str, Any]:
    idle: dict[str, dict[str, float]] = {}
    for target in targets:  # warm-up: connections, caches, the store's first pages
        run_loadgen(target.url, max(50, target.requests // 10), 8, False)
        run_loadgen(target.url, max(20, target.requests // 20), 8, True)
        idle[target.name] = tree_rss_mib(target.service.pid)
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {
        t.name: {mode: {str(c): [] for c in args.concurrency} for mode in MODES} for t in targets
    }
    for round_index in range(args.rounds):
        started = time.monotonic()
        for mode in MODES:
            for concurrency in args.concurrency:
                for target in targets:
                    cell = run_cell(target, concurrency, mode)
                    raw[target.name][mode][str(concurrency)].append(cell)
        print(
            f"proxy_compare: round {round_index + 1}/{args.rounds} took {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    summary: dict[str, Any] = {}
    for target in targets:
        summary[target.name] = {
            mode: {
                c: summarise(cells, None if target.name == "direct" else raw["direct"][mode][c])
                for c, cells in by_c.items()
            }
            for mode, by_c in raw[target.name].items()
        }
    memory = {
        t.name: {"after_warmup": idle[t.name], "end": tree_rss_mib(t.service.pid)}
        for t in targets
        if t.name != "direct"
    }
    return {"summary": summary, "memory": memory, "raw": raw}


def targets_met(summary: dict[str, Any], memory: dict[str, Any]) -> list[dict[str, Any]]:
    """The three targets against LiteLLM; a figure that could not be measured is 'not met'."""
    if "litellm" not in summary:
        return []
    us, ll = summary["understudy"]["chat"], summary["litellm"]["chat"]
    rss = {name: memory[name]["end"]["peak_rss_mib"] for name in ("understudy", "litellm")}

    def added_p50() -> tuple[str, bool]:
        mine, theirs = us["1"]["added_p50_ms"], ll["1"]["added_p50_ms"]
        share = f" (1/{theirs / mine:.0f})" if mine > 0 else ""
        return f"{mine:.3f} ms vs {theirs:.3f} ms{share}", mine <= theirs / 20

    def throughput() -> tuple[str, bool]:
        ratio = us["32"]["rps"] / ll["32"]["rps"]
        return f"{us['32']['rps']:.0f} vs {ll['32']['rps']:.0f} req/s ({ratio:.1f}x)", ratio >= 30

    def memory_ratio() -> tuple[str, bool]:
        ratio = rss["understudy"] / rss["litellm"]
        return f"{rss['understudy']:.0f} vs {rss['litellm']:.0f} MiB ({ratio:.2f})", ratio <= 0.5

    checks = []
    for target, figure in (
        ("Understudy's added p50 at concurrency 1 <= 1/20 of LiteLLM's", added_p50),
        ("Understudy's req/s at concurrency 32 >= 30x LiteLLM's", throughput),
        ("Understudy's peak RSS <= 1/2 of LiteLLM's", memory_ratio),
    ):
        try:
            value, met = figure()
        except (KeyError, TypeError, ZeroDivisionError):
            value, met = "not measured in this run", False
        checks.append({"target": target, "value": value, "met": met})
    return checks


def number(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'mode':>6} {'conc':>5} {'target':>10} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} {'ttft ms':>8}"
    ]
    for mode in MODES:
        for target, by_mode in result["summary"].items():
            for c, s in by_mode[mode].items():
                lines.append(
                    f"{mode:>6} {c:>5} {target:>10} {number(s['p50_ms'], 9, 2)} {number(s['p99_ms'], 9, 2)} "
                    f"{number(s['rps'], 8, 0)} {number(s['ttft_p50_ms'], 8, 2)}"
                )
    for name, figures in result["memory"].items():
        lines.append(f"{name}: RSS after warm-up {figures['after_warmup']['rss_mib']:.0f} MiB, "
                     f"peak {figures['end']['peak_rss_mib']:.0f} MiB")  # fmt: skip
    for check in result["targets"]:
        lines.append(f"{'MET' if check['met'] else 'NOT MET'}: {check['target']}: {check['value']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per cell, direct and Understudy")
    parser.add_argument("--litellm-requests", type=int, default=300, help="per cell, LiteLLM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument(
        "--min-waves", type=int, default=3, help="requests per cell >= this x the concurrency"
    )
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "proxy_compare.json")
    args = parser.parse_args()
    litellm_version = None
    if not args.skip_litellm:
        litellm_version = litellm_proxy.ensure_venv(RESULTS / "litellm-install.log")
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, Services() as services:
        workdir = Path(tmp)
        upstream, upstream_url = start_fakecloud(services, workdir)
        targets = [Target("direct", upstream_url, upstream, args.requests, args.min_waves)]
        understudy, url = start_understudy(services, workdir, upstream_url)
        targets.append(Target("understudy", url, understudy, args.requests, args.min_waves))
        if not args.skip_litellm:
            port = free_port()
            service = litellm_proxy.start(services, workdir, f"{upstream_url}/v1", port, API_KEY)
            targets.append(
                Target("litellm", f"http://127.0.0.1:{port}", service, args.litellm_requests, args.min_waves)
            )
        result = measure(targets, args)
        result["commands"] = {t.name: t.service.command for t in targets}
        configs = {"understudy": workdir / "gateway.yaml", "litellm": workdir / "litellm.yaml"}
        result["configs"] = {name: path.read_text() for name, path in configs.items() if path.exists()}
    result["targets"] = targets_met(result["summary"], result["memory"])
    result["settings"] = {
        "requests": args.requests,
        "litellm_requests": args.litellm_requests,
        "rounds": args.rounds,
        "min_waves": args.min_waves,
        "concurrency": args.concurrency,
        "workers": {"understudy": 1, "litellm": 1},
        "litellm_version": litellm_version,
        "load_average_after": os.getloadavg(),
    }
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
