"""Time to first token and answer latency through the gateway: the local model against a
cloud that takes 300 ms to its first byte, on the demo task (bench/adaptive.py's task).

    .venv/bin/python bench/local_latency.py [--requests 40] [--dtype auto] [--quantize auto]

One gateway, two routes: `cloud` forwards to the fake cloud (model `slow-300`, which waits
300 ms and then answers the task's JSON exactly), `local` forwards to a local backend
serving one fp32-trained task adapter (trained once by bench/precision_accuracy.py's helper,
reused) in the chosen precision. Both go through the same proxy path, so the difference is
the answerer. Requests are streamed, one at a time, alternating local and cloud; time to
first token is the first content chunk, latency the whole answer. Results:
bench/results/local_latency.json.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/: bench/local_backend.py would shadow the package

from precision_accuracy import task_adapter  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.demo import task  # noqa: E402
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer  # noqa: E402
from gateway.demo.run import GatewayThread, free_port  # noqa: E402
from gateway.settings import Settings  # noqa: E402

CLOUD_MODEL = "slow-300"
LOCAL_MODEL = "task-local"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=40, help="per side")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=100, help="pairs the task adapter trains on")
    parser.add_argument("--cache", type=Path, default=REPO / ".understudy")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "local_latency.json")
    return parser.parse_args()


def start_backend(args: argparse.Namespace, adapter: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "local_backend", "--model", args.model, "--port", str(port)]
    command += ["--data-dir", str(args.cache), "--log-level", "warning", "--threads", str(args.threads)]
    command += ["--dtype", args.dtype, "--quantize", args.quantize, "--lora", f"task={adapter}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the backend exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the backend did not become ready")


def gateway_settings(work: Path, cloud_url: str, local_url: str, port: int) -> Settings:
    return Settings.model_validate(
        {
            "port": port,
            "data_dir": work,
            "upstream": {"base_url": cloud_url},
            "upstreams": {"local": {"base_url": local_url}},
            "local": {"enabled": False},
            "routes": [
                {"name": "cloud", "match": [CLOUD_MODEL]},
                {"name": "local", "match": [LOCAL_MODEL], "upstream": "local", "upstream_model": "task"},
            ],
        }
    )


def timed(client: openai.OpenAI, model: str, example: task.Example) -> dict[str, Any]:
    """(time to first content, whole answer, whether it is right) of one streamed request."""
    started = time.perf_counter()
    first: float | None = None
    text = ""
    messages: Any = example.messages()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            text += chunk.choices[0].delta.content
    total = time.perf_counter() - started
    right = _same_json(text, example.answer)
    return {"ttft_s": first if first is not None else total, "total_s": total, "right": right}


def _same_json(text: str, expected: str) -> bool:
    from gateway.demo.run import same_json

    return same_json(text, expected)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(1000 * statistics.median(ordered), 1), "p95_ms": round(1000 * p95, 1)}


def main() -> None:
    args = parse_args()
    adapter = task_adapter(args.model, args.cache, args.threads, args.pairs)
    cloud = FakeCloudServer(FakeCloud(answer=task.cloud_answer, record=False)).start()
    backend_port, port = free_port(), free_port()
    backend = start_backend(args, adapter, backend_port, args.cache / "bench-latency-backend.log")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
            settings = gateway_settings(
                Path(tmp), cloud.base_url, f"http://127.0.0.1:{backend_port}/v1", port
            )
            gateway = GatewayThread(create_app(settings), port)
            gateway.start()
            try:
                client = openai.OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench", max_retries=0
                )
                results = measure(client, args.requests)
            finally:
                gateway.stop()
    finally:
        backend.terminate()
        backend.wait(timeout=30)
        cloud.stop()
    results |= {
        "dtype": args.dtype,
        "quantize": args.quantize,
        "threads": args.threads,
        "adapter": str(adapter),
    }
    results["load_average_1m"] = round(os.getloadavg()[0], 2)
    text = json.dumps(results, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


def measure(client: openai.OpenAI, requests: int) -> dict[str, Any]:
    examples = task.examples(requests + 2, seed=13)
    for example in examples[:2]:  # warm both paths
        timed(client, LOCAL_MODEL, example)
        timed(client, CLOUD_MODEL, example)
    seen: dict[str, list[dict[str, Any]]] = {"local": [], "cloud": []}
    for example in examples[2:]:
        seen["local"].append(timed(client, LOCAL_MODEL, example))
        seen["cloud"].append(timed(client, CLOUD_MODEL, example))
    out: dict[str, Any] = {"requests_per_side": requests, "cloud_first_byte_delay_ms": 300}
    for side, rows in seen.items():
        out[side] = {
            "ttft": percentiles([r["ttft_s"] for r in rows]),
            "latency": percentiles([r["total_s"] for r in rows]),
            "right_share": sum(r["right"] for r in rows) / len(rows),
        }
    return out


if __name__ == "__main__":
    main()
