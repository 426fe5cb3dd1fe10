"""Run every benchmark in one go and write docs/BENCHMARKS.md with its tables and plots.

    .venv/bin/python bench/run_all.py            # full (what `make bench` runs; see the timing below)
    .venv/bin/python bench/run_all.py --quick    # tiny counts, a smoke run of a few minutes
    .venv/bin/python bench/run_all.py --quick --skip-litellm --skip-llamacpp   # no network needed

Steps, each its own script and process, run one after another so they do not compete for the
cores: the proxy comparison (Understudy vs LiteLLM's proxy vs direct), the local model server
(vs `model.generate`, and vs llama-cpp-python's server), the local model's precision modes
(fp32, bf16, int8, int4 servers side by side on the bundled model and on a TinyLlama-1.1B-shaped
one), training (vs a plain peft loop), overload, and with --adaptive the adaptive cycle. A full
run takes ~15 min on 2 cores plus the precision step (up to an hour: a 1.1B model, one thread
per server). A step that fails is reported as failed with the end of its output; the others
still run. Results land in bench/results/*.json (this run's only: each step's file is removed
before it runs), logs in bench/results/logs/.
LiteLLM and llama-cpp-python are installed into their own venvs under bench/ on first use
(network needed then); --quick never builds llama-cpp-python, it only uses one already built.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litellm_proxy
import llamacpp
import report
from harness import REPO, RESULTS

VERSIONS_OF = (
    "starlette", "uvicorn", "uvloop", "httptools", "aiohttp", "orjson", "pydantic",
    "torch", "transformers", "peft", "outlines", "litellm",
)  # fmt: skip


@dataclass
class Step:
    name: str
    script: str
    args: list[str]
    results: list[str]
    timeout_s: float
    skip_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "bench" / self.script), *self.args]

    def shown(self) -> str:
        return shlex.join([".venv/bin/python", f"bench/{self.script}", *self.args])


def plan(args: argparse.Namespace) -> list[Step]:
    q = args.quick
    proxy_args = (
        ["--requests", "200", "--litellm-requests", "30", "--min-waves", "1"] if q else ["--requests", "2000"]
    )
    proxy_args += ["--rounds", "3" if q else "5"]
    if not q:
        proxy_args += ["--litellm-requests", "300"]
    if args.skip_litellm:
        proxy_args.append("--skip-litellm")
    # Five rounds in full: on a shared machine a round or two can be hit by a neighbour's burst.
    local_args = ["--tokens", "16", "--rounds", "1"] if q else ["--tokens", "128", "--rounds", "5"]
    llama_args = ["--tokens", "16", "--rounds", "1"] if q else ["--tokens", "128", "--rounds", "5"]
    # One thread per server: the four modes' servers are up at once on the same cores.
    precision_args = ["--precision", "--threads", "1"]
    if q:
        precision_args += ["--tokens", "8", "--rounds", "1", "--big-tokens", "4", "--big-rounds", "1"]
    else:
        precision_args += ["--tokens", "64", "--rounds", "3", "--big-tokens", "32", "--big-rounds", "2"]
    if q:
        train_args = ["--steps", "2", "--warmup", "1", "--rounds", "1", "--seq", "128"]
    else:
        train_args = ["--steps", "6", "--warmup", "1", "--rounds", "2", "--seq", "256"]
    train_args += ["--mode", "side-by-side"]
    overload_args = (
        ["--seconds", "3", "--baseline-seconds", "1"] if q else ["--seconds", "10", "--baseline-seconds", "3"]
    )
    results = "bench/results"
    steps = [
        Step("proxy", "proxy_compare.py", proxy_args, ["proxy_compare.json"], 2400),
        Step(
            "local",
            "local_backend.py",
            [*local_args, "--data-dir", ".understudy", "--json", f"{results}/local_backend.json"],
            ["local_backend.json"],
            1800,
            extra={"concurrency": 8},
        ),
        Step("llamacpp", "llamacpp.py", llama_args, ["llamacpp.json"], 2400),
        Step(
            "precision",
            "local_backend.py",
            [*precision_args, "--data-dir", ".understudy", "--json", f"{results}/local_precision.json"],
            ["local_precision.json"],
            1800 if q else 3600,
            extra={"concurrency": 8},
        ),
        Step("train", "train.py", [*train_args, "--out", f"{results}/train.json"], ["train.json"], 2400),
        Step("overload", "overload.py", overload_args, ["overload.json"], 600),
    ]
    if args.adaptive:
        steps.append(
            Step("adaptive", "adaptive.py", ["--next", "100" if q else "300"], ["adaptive.json"], 2400)
        )
    for step in steps:
        if step.name == "llamacpp" and args.skip_llamacpp:
            step.skip_reason = "--skip-llamacpp"
        elif step.name == "llamacpp" and q and not llamacpp.installed_version():
            step.skip_reason = "--quick does not build llama-cpp-python (run the full bench once)"
        if step.name in args.skip:
            step.skip_reason = f"--skip {step.name}"
    return steps


def run_step(step: Step, logs: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"command": step.shown(), **step.extra}
    if step.skip_reason:
        return {**info, "status": "skipped", "reason": step.skip_reason}
    for name in step.results:
        (RESULTS / name).unlink(missing_ok=True)
    log = logs / f"{step.name}.log"
    print(f"== {step.name}: {step.shown()}", flush=True)
    started = time.monotonic()
    info["load_before"] = os.getloadavg()[0]
    with log.open("wb") as out:
        # Its own session, so a timeout kills whatever it started too.
        process = subprocess.Popen(
            step.command(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            returncode = -9
        except BaseException:
            os.killpg(process.pid, 9)
            process.wait()
            raise
    info.update(seconds=time.monotonic() - started, returncode=returncode, load_after=os.getloadavg()[0])
    missing = [name for name in step.results if not (RESULTS / name).exists()]
    if returncode == 0 and not missing:
        info["status"] = "ok"
    else:
        info["status"] = "failed"
        info["error"] = log.read_text(errors="replace")[-3000:]
    print(f"   {info['status']} in {info['seconds']:.0f} s (log: {log.relative_to(REPO)})", flush=True)
    return info


def code_version() -> str:
    """The commit measured, and whether the measured code differs from it (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "gateway", "local_backend", "trainer"], cwd=REPO
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes in gateway/local_backend/trainer" if dirty.returncode else "")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        ram_kib = int(meminfo.readline().split()[1])
    versions = {}
    for name in VERSIONS_OF:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_kib / 1024**2,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_start": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--skip-litellm", action="store_true", help="no LiteLLM (and no network)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="no llama-cpp-python")
    parser.add_argument("--adaptive", action="store_true", help="also the adaptive cycle (several minutes)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["proxy", "local", "llamacpp", "precision", "train", "overload"],
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "command": "make bench" if sys.argv[1:] == [] else shlex.join(["bench/run_all.py", *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "code": code_version(),
        "machine": machine(),
        "steps": {},
    }
    steps = plan(args)
    if not args.skip_litellm and not any(s.name == "proxy" and s.skip_reason for s in steps):
        try:
            meta["machine"]["litellm_proxy"] = "litellm " + litellm_proxy.ensure_venv(
                logs / "litellm-install.log"
            )
        except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
            print(f"LiteLLM's venv could not be set up ({exc}); the proxy step runs without it", flush=True)
            steps[0].args.append("--skip-litellm")
    for step in steps:
        meta["steps"][step.name] = run_step(step, logs)
        if step.name == "llamacpp":
            meta["machine"]["llama_cpp"] = llamacpp.installed_version()
    meta["machine"]["load_end"] = os.getloadavg()[0]
    meta["seconds"] = time.monotonic() - started
    (RESULTS / "run.json").write_text(json.dumps(meta, indent=1))
    report.render(RESULTS, args.docs)
    print(f"wrote {args.docs.relative_to(REPO) if args.docs.is_relative_to(REPO) else args.docs}")
    failed = [name for name, info in meta["steps"].items() if info["status"] == "failed"]
    if failed:
        print(f"failed steps: {', '.join(failed)} (see bench/results/logs/)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
