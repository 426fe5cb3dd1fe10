"""The adaptive cycle on the bundled SmolLM2, measured: how many requests and how long until the
route is promoted, the share of the next N requests served locally, the held-out pass rate of
the local model vs the base model, and the cloud calls and cost saved.

    .venv/bin/python bench/adaptive.py [--next 500] [--heldout 40] [--price-model gpt-4o-mini]

The task (name/age/city extraction, gateway/demo/task.py) is answered exactly by a simulated
cloud; evaluation prompts are drawn with other seeds than training prompts, so the model never
trained on them. Cost uses litellm's bundled price map (offline) for `--price-model`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import orjson

REPO = Path(__file__).resolve().parent.parent
# bench/local_backend.py would shadow the local_backend package for scripts run from bench/.
sys.path.insert(0, str(REPO))

from gateway.app import create_app  # noqa: E402
from gateway.demo import task  # noqa: E402
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer  # noqa: E402
from gateway.demo.run import CLOUD_MODEL, ROUTE, GatewayThread, demo_settings, free_port, same_json  # noqa: E402


def litellm_prices(model: str) -> tuple[float, float]:
    """(input, output) USD per token from litellm's bundled map, read without importing litellm."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    entry = json.loads(path.read_text())[model]
    return float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"])


def ask(client: openai.OpenAI, example: task.Example, model: str = CLOUD_MODEL) -> tuple[str, str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=example.messages(),  # type: ignore[arg-type]
        max_tokens=40,
        temperature=0,
    )
    completion = raw.parse()
    backend = raw.headers.get("x-understudy-backend", "local")
    return backend, completion.choices[0].message.content or "", completion.usage


def until_promoted(app: Any, client: openai.OpenAI) -> tuple[int, float, int]:
    """Send traffic until the route is local; return (requests, seconds, adapter versions)."""
    controller = app.services.controller
    stream = iter(task.examples(5000, seed=11))
    started, sent = time.monotonic(), 0
    while (state := controller.describe(ROUTE))["mode"] != "local":
        if state["mode"] in ("cloud", "eval"):
            ask(client, next(stream))
            sent += 1
        time.sleep(0.05 if state["mode"] == "cloud" else 0.5)
    return sent, time.monotonic() - started, int(state["active_adapter"])


def serve_next(client: openai.OpenAI, count: int) -> list[tuple[str, str, Any]]:
    examples = task.examples(count, seed=12)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda e: ask(client, e), examples))


def pass_rate(client: openai.OpenAI, model: str, examples: list[task.Example]) -> float:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda e: ask(client, e, model)[1], examples))
    return sum(same_json(a, e.answer) for a, e in zip(answers, examples, strict=True)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--next", type=int, default=500, help="requests measured after promotion")
    parser.add_argument("--heldout", type=int, default=40, help="unseen prompts for the pass rates")
    parser.add_argument("--price-model", default="gpt-4o-mini")
    parser.add_argument("--data-dir", default=str(REPO / ".understudy"), help="model cache lives here")
    args = parser.parse_args()

    cloud = FakeCloudServer(FakeCloud(answer=task.cloud_answer, record=False)).start()
    root = Path(args.data_dir)
    (root / "models").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        work = Path(tmp)
        (work / "models").symlink_to((root / "models").resolve())
        port = free_port()
        settings = demo_settings(work, cloud.base_url, port, min_samples=40)
        app = create_app(settings)
        gateway = GatewayThread(app, port)
        gateway.start()
        try:
            backend = app.services.backend
            while not backend.healthy.is_set():
                time.sleep(0.5)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench", max_retries=0)
            requests, seconds, version = until_promoted(app, client)
            started = time.monotonic()
            served = serve_next(client, args.next)
            serve_s = time.monotonic() - started
            heldout = task.examples(args.heldout, seed=13)
            local_client = openai.OpenAI(base_url=settings.local_base_url, api_key="x", max_retries=0)
            local_rate = pass_rate(local_client, f"{ROUTE}-v{version}", heldout)
            base_rate = pass_rate(local_client, "SmolLM2-135M-Instruct", heldout)
        finally:
            gateway.stop()
            cloud.stop()

    local = [s for s in served if s[0] in ("local", "failover")]
    prompt_tokens = sum(s[2].prompt_tokens for s in local if s[2])
    completion_tokens = sum(s[2].completion_tokens for s in local if s[2])
    price_in, price_out = litellm_prices(args.price_model)
    saved = prompt_tokens * price_in + completion_tokens * price_out
    correct = sum(
        same_json(answer, e.answer)
        for (_, answer, _), e in zip(served, task.examples(args.next, seed=12), strict=True)
    )
    results = {
        "requests_until_promotion": requests,
        "seconds_until_promotion": round(seconds, 1),
        "adapter_versions_trained": version,
        "next_requests": args.next,
        "served_locally_share": len(local) / len(served),
        "next_requests_correct_share": correct / len(served),
        "next_requests_seconds": round(serve_s, 1),
        "heldout_pass_rate_local": local_rate,
        "heldout_pass_rate_base": base_rate,
        "cloud_calls_saved": len(local),
        "tokens_served_locally": {"prompt": prompt_tokens, "completion": completion_tokens},
        "cost_saved_usd": round(saved, 6),
        "price_model": args.price_model,
        "cost_saved_usd_per_1m_requests": round(saved / max(1, len(local)) * 1e6, 2),
    }
    print(json.dumps(results, indent=2))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive.json").write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
