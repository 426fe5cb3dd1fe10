"""The adaptive cycle on the bundled SmolLM2, measured: how many requests, how long and how many
training jobs until the route is promoted, then who answers the next N requests and whether
what the client receives is right, the held-out pass rate of the local model vs the base model,
and the cloud calls and cost saved.

    .venv/bin/python bench/adaptive.py [--variant plain|tools|both] [--next 300] [--min-samples 100]
        [--rate 1] [--rule new|old|both]

Two variants of one task (name/age/city extraction, gateway/demo/task.py), each on a fresh
gateway and data dir:
  plain  the client asks for the JSON as text; right = the content parses to the expected JSON
  tools  the client offers one tool, `record_person` (name/age/city), with tool_choice "auto",
         and the cloud always calls it; right = exactly one tool call, named record_person,
         whose arguments parse to the expected JSON
The simulated cloud answers exactly. The route runs the default policy except `min_samples`
and the `json_equal` judge (tool calls are compared as parsed JSON); clients send `--rate`
requests per second while the cloud answers (the issue's target: local within 10 minutes at
1 request/s). `--rule old` trains with the rule before issue 14 (10 epochs over every pair, no
validation slice, no early stopping) as route `training:` overrides; `--rule both` runs the
two on the same traffic, one after the other, for time to promotion side by side (results in
bench/results/adaptive_rules.json). Evaluation prompts are
drawn with other seeds than training prompts, so the model never trained on them. Cost uses
litellm's bundled price map (offline) for `--price-model`. Results go to
bench/results/adaptive.json (plain) and adaptive_tools.json. A route not promoted within
`--promotion-budget-s` is reported with its history and eval verdicts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
from openai.types.chat import ChatCompletion

REPO = Path(__file__).resolve().parent.parent
# bench/local_backend.py would shadow the local_backend package for scripts run from bench/.
sys.path.insert(0, str(REPO))

from gateway.app import UnderstudyApp, create_app  # noqa: E402
from gateway.demo import task  # noqa: E402
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer  # noqa: E402
from gateway.demo.run import CLOUD_MODEL, ROUTE, GatewayThread, free_port  # noqa: E402
from gateway.settings import Settings  # noqa: E402

TOOL_NAME = "record_person"
RECORD_PERSON = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Record the person a sentence describes.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "city": {"type": "string"},
            },
            "required": ["name", "age", "city"],
            "additionalProperties": False,
        },
    },
}
TOOLS_SYSTEM = "Record the person the sentence describes: call record_person with their name, age and city."


@dataclass(frozen=True)
class Variant:
    """How the client asks, and how it reads the answer back (None: unreadable)."""

    name: str
    max_tokens: int
    extra: dict[str, Any]
    system: str
    read: Callable[[ChatCompletion], Any]

    def request(self, example: task.Example, model: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": example.sentence}]
        return {
            "model": model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            **self.extra,
        }


def read_content(completion: ChatCompletion) -> Any:
    return parsed_json(completion.choices[0].message.content or "")


def read_tool_call(completion: ChatCompletion) -> Any:
    calls = completion.choices[0].message.tool_calls or []
    if len(calls) != 1 or calls[0].type != "function" or calls[0].function.name != TOOL_NAME:
        return None
    return parsed_json(calls[0].function.arguments)


def parsed_json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


VARIANTS = {
    "plain": Variant("plain", 40, {}, task.SYSTEM, read_content),
    # A call block is ~40 SmolLM2 tokens; 64 leaves room for the closing tag and <|im_end|>.
    "tools": Variant(
        "tools", 64, {"tools": [RECORD_PERSON], "tool_choice": "auto"}, TOOLS_SYSTEM, read_tool_call
    ),
}


def cloud_tool_calls(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The simulated cloud's tool answer: when record_person is offered, always call it with
    the exact extraction."""
    offered = {t.get("function", {}).get("name") for t in body.get("tools") or []}
    extracted = parsed_json(task.cloud_answer(body))
    if TOOL_NAME not in offered or not isinstance(extracted, dict):
        return None
    return [{"function": {"name": TOOL_NAME, "arguments": extracted}}]


def litellm_prices(model: str) -> tuple[float, float]:
    """(input, output) USD per token from litellm's bundled map, read without importing litellm."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    entry = json.loads(path.read_text())[model]
    return float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"])


# The training rule before issue 14: epochs_for(80) gave 10 epochs over every pair.
OLD_RULE = {"epochs": 10, "validation_fraction": 0.0, "early_stopping_patience": 0, "max_samples": 100_000}


def bench_settings(
    data_dir: Path, cloud_url: str, port: int, min_samples: int, cooldown_s: float | None, rule: str = "new"
) -> Settings:
    policy: dict[str, Any] = {"min_samples": min_samples, "judge": "json_equal"}
    if cooldown_s is not None:
        policy["cooldown_s"] = cooldown_s
    route = {"name": ROUTE, "match": [CLOUD_MODEL], "adapt": True, "policy": policy}
    if rule == "old":
        route["training"] = OLD_RULE
    return Settings.model_validate(
        {
            "port": port,
            "data_dir": data_dir,
            "upstream": {"base_url": cloud_url},
            "local": {"enabled": True, "port": free_port()},
            "routes": [route],
        }
    )


@dataclass
class Answer:
    backend: str
    completion: ChatCompletion
    expected: Any
    variant: Variant

    @property
    def correct(self) -> bool:
        return bool(self.variant.read(self.completion) == self.expected)

    @property
    def well_formed(self) -> bool:
        """Readable as an extraction at all: a JSON object (plain), one record_person call
        with JSON-object arguments (tools)."""
        return isinstance(self.variant.read(self.completion), dict)

    @property
    def local(self) -> bool:
        return self.backend in ("local", "failover")


def ask(client: openai.OpenAI, variant: Variant, example: task.Example, model: str = CLOUD_MODEL) -> Answer:
    raw = client.chat.completions.with_raw_response.create(**variant.request(example, model))
    backend = raw.headers.get("x-understudy-backend", "local")
    return Answer(backend, raw.parse(), orjson.loads(example.answer), variant)


def until_promoted(
    app: UnderstudyApp, client: openai.OpenAI, variant: Variant, budget_s: float, rate: float
) -> dict[str, Any]:
    """Send `rate` requests a second until the route is local or the budget is spent (as an
    app would, through training too); return what it took."""
    controller = app.services.controller
    assert controller is not None
    stream = iter(task.examples(20_000, seed=11))
    started, sent = time.monotonic(), 0
    while (state := controller.describe(ROUTE))["mode"] != "local":
        if time.monotonic() - started > budget_s:
            break
        ask(client, variant, next(stream))
        sent += 1
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    return {
        "promoted": state["mode"] == "local",
        "requests_until_promotion": sent,
        "seconds_until_promotion": round(time.monotonic() - started, 1),
        "training_jobs": sum(1 for h in state["history"] if h["to"] == "training"),
        "adapter_promoted": state["active_adapter"],
        "history": [f"{h['from']} -> {h['to']}: {h['reason']}" for h in state["history"]],
    }


def serve_next(client: openai.OpenAI, variant: Variant, count: int) -> list[Answer]:
    examples = task.examples(count, seed=12)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda e: ask(client, variant, e), examples))


def pass_rate(client: openai.OpenAI, variant: Variant, model: str, examples: list[task.Example]) -> float:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda e: ask(client, variant, e, model), examples))
    return sum(a.correct for a in answers) / len(examples)


def eval_summary(app: UnderstudyApp) -> dict[str, Any]:
    """Verdicts per adapter version and phase, with a few failed answers side by side."""
    rows = app.services.store.list_evals(ROUTE, 2000)
    counts: Counter[str] = Counter()
    failed: list[dict[str, Any]] = []
    for row in reversed(rows):
        result = "error" if row["error"] else "pass" if row["passed"] else "fail"
        counts[f"v{row['adapter_version']} {row['phase']} {result}"] += 1
        if result != "pass" and len(failed) < 6:
            failed.append(
                {k: row[k] for k in ("adapter_version", "phase", "cloud_answer", "local_answer", "error")}
            )
    return {"verdicts": dict(sorted(counts.items())), "not_passed_examples": failed}


def adapters_trained(app: UnderstudyApp) -> list[dict[str, Any]]:
    controller = app.services.controller
    assert controller is not None
    keys = ("train_count", "heldout_count", "trained_with_tools", "steps_run", "stop_reason", "train_loss")
    return [
        {
            "version": a.version,
            **{k: a.meta.get(k) for k in keys},
            "seconds": a.meta.get("timing", {}).get("total_seconds"),
        }
        for a in controller.adapters.versions(ROUTE)
    ]


class LoadWatch:
    """The machine is shared: the 1-minute load average through a run, sampled every few
    seconds, says how much of the wall time was someone else's."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoadWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self._every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": round(max(self.samples), 2)}


def run_variant(
    variant: Variant, args: argparse.Namespace, cloud: FakeCloudServer, rule: str = "new"
) -> dict[str, Any]:
    root = Path(args.data_dir)
    (root / "models").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        work = Path(tmp)
        (work / "models").symlink_to((root / "models").resolve())
        port = free_port()
        settings = bench_settings(work, cloud.base_url, port, args.min_samples, args.cooldown_s, rule)
        app = create_app(settings)
        gateway = GatewayThread(app, port)
        gateway.start()
        load = LoadWatch().start()
        try:
            backend = app.services.backend
            assert backend is not None
            while not backend.healthy.is_set():
                time.sleep(0.5)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench", max_retries=0)
            results: dict[str, Any] = {
                "variant": variant.name,
                "training_rule": rule,
                "min_samples": args.min_samples,
                "rate_per_s": args.rate,
                "policy": settings.routes[0].policy.model_dump(exclude={"synthetic"}),
            }
            results |= until_promoted(app, client, variant, args.promotion_budget_s, args.rate)
            if results["promoted"]:
                results |= measure_served(client, variant, args)
                results |= heldout_rates(settings, variant, results["adapter_promoted"], args.heldout)
            results["load_average_1m"] = load.summary()
            results["evals"] = eval_summary(app)
            results["adapters"] = adapters_trained(app)
        finally:
            load.stop()
            gateway.stop()
    return results


def measure_served(client: openai.OpenAI, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    served = serve_next(client, variant, args.next)
    seconds = time.monotonic() - started
    local = [a for a in served if a.local]
    usage = [a.completion.usage for a in local if a.completion.usage]
    prompt_tokens = sum(u.prompt_tokens for u in usage)
    completion_tokens = sum(u.completion_tokens for u in usage)
    price_in, price_out = litellm_prices(args.price_model)
    saved = prompt_tokens * price_in + completion_tokens * price_out
    return {
        "next_requests": len(served),
        "next_requests_seconds": round(seconds, 1),
        "served_locally_share": len(local) / len(served),
        "local_answers_well_formed_share": share(local, lambda a: a.well_formed),
        "local_answers_correct_share": share(local, lambda a: a.correct),
        "next_requests_correct_share": sum(a.correct for a in served) / len(served),
        "cloud_calls_saved": len(local),
        "tokens_served_locally": {"prompt": prompt_tokens, "completion": completion_tokens},
        "cost_saved_usd": round(saved, 6),
        "price_model": args.price_model,
        "cost_saved_usd_per_1m_requests": round(saved / max(1, len(local)) * 1e6, 2),
    }


def share(answers: list[Answer], test: Callable[[Answer], bool]) -> float | None:
    return sum(map(test, answers)) / len(answers) if answers else None


def heldout_rates(settings: Settings, variant: Variant, version: int, count: int) -> dict[str, Any]:
    heldout = task.examples(count, seed=13)
    local_client = openai.OpenAI(base_url=settings.local_base_url, api_key="x", max_retries=0)
    return {
        "heldout_pass_rate_local": pass_rate(local_client, variant, f"{ROUTE}-v{version}", heldout),
        "heldout_pass_rate_base": pass_rate(local_client, variant, "SmolLM2-135M-Instruct", heldout),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--variant", choices=("plain", "tools", "both"), default="plain")
    parser.add_argument("--next", type=int, default=300, help="requests measured after promotion")
    parser.add_argument("--heldout", type=int, default=40, help="unseen prompts for the pass rates")
    parser.add_argument("--min-samples", type=int, default=100, help="policy.min_samples")
    parser.add_argument(
        "--cooldown-s", type=float, default=None, help="policy.cooldown_s (default: the policy's)"
    )
    parser.add_argument("--rate", type=float, default=1.0, help="client requests per second")
    parser.add_argument("--rule", choices=("new", "old", "both"), default="new", help="training rule")
    parser.add_argument("--promotion-budget-s", type=float, default=1200.0, help="give up on promotion after")
    parser.add_argument("--price-model", default="gpt-4o-mini")
    parser.add_argument("--data-dir", default=str(REPO / ".understudy"), help="model cache lives here")
    args = parser.parse_args()

    # A plain SIGTERM would skip the clean-up below and leave the local backend running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = ["plain", "tools"] if args.variant == "both" else [args.variant]
    cloud = FakeCloudServer(
        FakeCloud(answer=task.cloud_answer, tool_answer=cloud_tool_calls, record=False)
    ).start()
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    rules = ["new", "old"] if args.rule == "both" else [args.rule]
    try:
        for name in names:
            by_rule = {}
            for rule in rules:
                by_rule[rule] = results = run_variant(VARIANTS[name], args, cloud, rule)
                print(json.dumps(results, indent=2), flush=True)
            if len(rules) == 1:
                suffix = "" if name == "plain" else f"_{name}"
                file = f"adaptive{suffix}.json" if rule == "new" else f"adaptive{suffix}_old_rule.json"
                (out / file).write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
                continue
            side = {
                rule: {k: r.get(k) for k in ("promoted", "requests_until_promotion", "seconds_until_promotion",
                                             "training_jobs", "served_locally_share", "local_answers_correct_share",
                                             "heldout_pass_rate_local", "load_average_1m", "adapters")}
                for rule, r in by_rule.items()
            }  # fmt: skip
            file = "adaptive_rules.json" if name == "plain" else f"adaptive_{name}_rules.json"
            (out / file).write_text(
                orjson.dumps({"variant": name, **side}, option=orjson.OPT_INDENT_2).decode()
            )
    finally:
        cloud.stop()


if __name__ == "__main__":
    main()
