"""Seed pairs against held-out pass rate, with and without synthetic data (issue 14).

For 20, 50 and 100 real pairs of the demo task (gateway/demo/task.py, name/age/city
extraction), one job trains on the real pairs alone and one on the real pairs plus synthetic
ones up to `--target` (the route's min_samples), written by the production generator
(gateway.adaptive.synthetic.Synthesizer) against the simulated cloud over HTTP: the cloud is
shown 5 sampled real prompts per call and writes new ones in the templates they use, then
answers each as it answers users. Every job runs the production trainer (same defaults, its
held-out split from real pairs only) through bench/train_rule.py's arm, and is scored on 50
fresh prompts with greedy decoding (JSON-equal answers). Cloud calls and their cost at
gpt-4o-mini's price (litellm's bundled map) are reported per arm.

    .venv/bin/python bench/synthetic_seeds.py [--seeds 20 50 100] [--target 100] [--threads 1]

Target (issue 14): 20 real pairs plus synthetic within 5 points of what 100 real pairs reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import train_rule  # noqa: E402

MODEL = "gpt-4o-mini"
CHAT = "/v1/chat/completions"


def record(kind: str, request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """A log record as the gateway writes it for a cloud answer (the trainer reads these)."""
    return {"kind": kind, "backend": "cloud", "status": 200, "outcome": "ok", "endpoint": CHAT,
            "request": request, "response": response}  # fmt: skip


async def ask(session: aiohttp.ClientSession, base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(base_url + "/chat/completions", json=body) as response:
        response.raise_for_status()
        answer: dict[str, Any] = await response.json()
        return answer


async def build(
    base_url: str, real: int, target: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The real pairs' records, then synthetic ones up to `target`; and what they cost."""
    import random

    from gateway.adaptive.synthetic import Synthesizer
    from gateway.demo import task
    from gateway.pricing import PriceBook
    from gateway.settings import SyntheticSettings

    prices = PriceBook()

    def price(answer: dict[str, Any]) -> float:
        usage = answer.get("usage") or {}
        return prices.cost(MODEL, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))

    records: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        requests = [{"model": MODEL, "messages": e.messages()} for e in task.examples(real, seed=11)]
        for request in requests:
            records.append(record("user", request, await ask(session, base_url, request)))
        cost = {"synthetic_prompts": 0, "synthetic": 0}

        async def cloud(body: dict[str, Any], kind: str) -> dict[str, Any]:
            answer = await ask(session, base_url, body)
            cost[kind] += 1
            if kind == "synthetic":
                records.append(record("synthetic", body, answer))
            return answer

        settings = SyntheticSettings(enabled=True, seed_samples=min(real, 20), max_cost_usd=1.0)
        known = [str(r["messages"][-1]["content"]) for r in requests]
        generator = Synthesizer(settings, cloud, price, requests, known, rng=random.Random(seed))
        outcome = await generator.run(max(0, target - real))
    spend = {
        "calls": outcome.calls,
        "writer_calls": cost["synthetic_prompts"],
        "answer_calls": cost["synthetic"],
        "added": outcome.added,
        "dropped_near_duplicates": outcome.dropped,
        "usd": round(outcome.spent_usd, 6),
        "stopped": outcome.stopped,
    }
    return records, spend


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--seeds", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--target", type=int, default=100, help="real + synthetic pairs (min_samples)")
    parser.add_argument("--heldout", type=int, default=50, help="fresh prompts for the pass rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(REPO / ".understudy"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "synthetic_seeds.json")
    parser.set_defaults(retrain_pairs=0)  # read by train_rule.launch
    args = parser.parse_args()
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LITELLM_LOCAL_MODEL_COST_MAP"):
        os.environ.setdefault(key, "1" if key != "LITELLM_LOCAL_MODEL_COST_MAP" else "True")

    from gateway.demo import task
    from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
    from trainer.dataset import write_jsonl

    train_rule.warm_model_cache(args.model, Path(args.cache))
    cloud = FakeCloudServer(FakeCloud(answer=task.cloud_answer)).start()
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-synthetic-") as tmp:
            for real in args.seeds:
                arms = [("real only", real)] + (
                    [("real + synthetic", args.target)] if real < args.target else []
                )
                for name, target in arms:
                    records, spend = asyncio.run(build(cloud.base_url, real, target, seed=real))
                    data = Path(tmp) / f"{real}-{target}.jsonl"
                    write_jsonl(data, records)
                    args.pairs = real
                    result = train_rule.launch("new", args, data)
                    row = {**result, "real_pairs": real, "arm": name, "synthetic": spend}
                    print(
                        json.dumps({k: row[k] for k in ("real_pairs", "arm", "pass_rate", "steps")}),
                        flush=True,
                    )
                    rows.append(row)
    finally:
        cloud.stop()
    by = {(r["real_pairs"], r["arm"]): r["pass_rate"] for r in rows}
    reference = by.get((args.target, "real only"))
    low = min(args.seeds)
    result = {
        "task": train_rule.TASK,
        "model": args.model,
        "target_pairs": args.target,
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
        "rows": rows,
        "target": f"{low} real + synthetic within 5 points of {args.target} real",
        "gap_points": (
            round(100 * (reference - by[(low, "real + synthetic")]), 1)
            if reference is not None and (low, "real + synthetic") in by
            else None
        ),
    }
    text = json.dumps(result, indent=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")
    for r in rows:
        s = r["synthetic"]
        print(f"{r['real_pairs']:>4} real  {r['arm']:<17} pass {r['pass_rate']:.0%}  steps {r['steps']:>3}  "
              f"synthetic {s['added']:>3} ({s['calls']} calls, ${s['usd']:.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
