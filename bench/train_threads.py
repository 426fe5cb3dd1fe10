"""A training job's threads against the local backend's state (issue 14, "use the machine").

The gateway gives a job every usable core while nothing is served locally and half of them
(at least one) while the local backend answers requests (trainer.spec.default_threads). This
measures both choices in both states, on the bundled SmolLM2 and the demo task's pairs:

- idle: nothing else runs; the job's seconds per optimizer step with all cores and with half;
- serving: a client sends the local backend one request after another (the demo prompt,
  32 new tokens) through the whole job; the job's seconds per step, and the backend's answer
  latency p50/p95 against its latency with no job running.

    .venv/bin/python bench/train_threads.py [--steps 12]

Each job is `python -m trainer` in its own process (`--max-steps`, `--threads`), one after the
other; the backend is `python -m local_backend` with the gateway's default threads (half the
cores). Results go to
bench/results/train_threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import train_rule  # noqa: E402


class Client(threading.Thread):
    """Asks the backend one request after another until stopped; keeps each latency."""

    def __init__(self, base_url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.base_url, self.body = base_url, body
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                http.post(self.base_url + "/chat/completions", json=self.body).raise_for_status()
                self.latencies.append(time.perf_counter() - started)


def percentiles(values: list[float]) -> dict[str, float | int]:
    if len(values) < 2:
        return {"count": len(values)}
    cuts = statistics.quantiles(values, n=20)
    return {"count": len(values), "p50_s": round(statistics.median(values), 3), "p95_s": round(cuts[18], 3)}


def train(work: Path, data: Path, args: argparse.Namespace, threads: int, tag: str) -> dict[str, Any]:
    data_dir = work / tag
    command = [sys.executable, "-m", "trainer", "--route", "task", "--data-dir", str(data_dir)]
    command += ["--data", str(data), "--model-cache", args.cache, "--base-model", args.model]
    command += ["--max-steps", str(args.steps), "--threads", str(threads), "--log-level", "WARNING"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"trainer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    meta = json.loads((data_dir / "adapters" / "task" / "v1" / "meta.json").read_text())
    return {
        "threads": threads,
        "steps": meta["steps_run"],
        "seconds_per_step": meta["timing"]["seconds_per_step"],
        "job_wall_s": round(wall, 1),
    }


def wait_ready(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, "local backend exited"
        try:
            if httpx.get(base_url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("local backend never became healthy")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per job")
    parser.add_argument("--baseline-s", type=float, default=30.0, help="backend latency with no job, seconds")
    parser.add_argument("--cache", default=str(REPO / ".understudy"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_threads.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from gateway.demo import task
    from trainer.dataset import write_jsonl
    from trainer.spec import default_threads, usable_cores

    train_rule.warm_model_cache(args.model, Path(args.cache))
    cores = usable_cores()
    choices = sorted(
        {default_threads(local_serving=False), default_threads(local_serving=True)}, reverse=True
    )
    port = 7391
    base_url = f"http://127.0.0.1:{port}/v1"
    results: dict[str, Any] = {"cores": cores, "model": args.model, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        data = work / "pairs.jsonl"
        write_jsonl(data, train_rule.chats(100, seed=11))
        results["idle"] = [train(work, data, args, n, f"idle-{n}") for n in choices]
        command = [sys.executable, "-m", "local_backend", "--model", args.model, "--port", str(port)]
        command += ["--data-dir", args.cache, "--threads", str(max(1, (os.cpu_count() or 2) // 2))]
        backend = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(base_url, backend)
            example = task.examples(1, seed=99)[0]
            body = {"model": args.model, "messages": example.messages(), "max_tokens": 32, "temperature": 0}
            baseline = Client(base_url, body)
            baseline.start()
            time.sleep(args.baseline_s)
            baseline.stop.set()
            baseline.join()
            results["backend_alone"] = percentiles(baseline.latencies[1:])
            serving = []
            for n in choices:
                client = Client(base_url, body)
                client.start()
                job = train(work, data, args, n, f"serving-{n}")
                client.stop.set()
                client.join()
                serving.append({**job, "backend_latency": percentiles(client.latencies[1:])})
            results["serving"] = serving
        finally:
            backend.terminate()
            backend.wait(30)
    results["gateway_choice"] = {
        "idle": default_threads(local_serving=False),
        "serving": default_threads(local_serving=True),
    }
    text = json.dumps(results, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
