"""The adaptive cycle on a task no test or demo uses, with the DEFAULT policy (only
`min_samples` lowered, as a team trying it would): does a route go local, and how fast?

    .venv/bin/python bench/fresh_task.py [--min-samples 100] [--rate 1.0] [--next 300]

The task is support-ticket triage: a customer message in, `{"category": ..., "urgent": ...}`
out. The simulated cloud answers it by rule and, as the default `upstream` judge, grades a
candidate against its own answer (similarity and precision 100 when the JSON is equal, 30
otherwise). The gateway has an upstream key of its own, as a deployment with OPENAI_API_KEY
set does, so held-out evals run. Traffic arrives at `--rate` requests per second; the script
reports the route's history, the time and requests to promotion, the training jobs it took,
and the share and correctness of the next `--next` answers the client receives.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.app import create_app  # noqa: E402
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer  # noqa: E402
from gateway.demo.run import GatewayThread, free_port  # noqa: E402
from gateway.settings import Settings  # noqa: E402

SYSTEM = 'Triage the support ticket. Answer with JSON only: {"category": ..., "urgent": true|false}.'
CATEGORIES = {
    "billing": ["I was charged twice for", "my invoice shows the wrong amount for", "please refund"],
    "shipping": ["my parcel with", "the delivery of", "tracking has not moved for"],
    "account": [
        "I cannot log in to my account after",
        "please reset the password I used for",
        "my profile lost",
    ],
    "technical": ["the app crashes when I open", "I get error 500 when saving", "sync stopped working for"],
}
THINGS = ["order 1182", "the blue kettle", "my March subscription", "the family plan", "order 7731",
          "the desk lamp", "my April renewal", "the team workspace", "gift card 55", "the spare charger"]  # fmt: skip
URGENT = ["This is urgent, please help today.", "I need this fixed right now!", "ASAP please."]
CALM = ["No rush.", "Whenever you can.", "Thanks in advance."]
ROUTE = "triage"


def ticket(rng: random.Random) -> tuple[str, dict[str, Any]]:
    category = rng.choice(sorted(CATEGORIES))
    urgent = rng.random() < 0.4
    text = (
        f"{rng.choice(CATEGORIES[category])} {rng.choice(THINGS)}. {rng.choice(URGENT if urgent else CALM)}"
    )
    return text, {"category": category, "urgent": urgent}


def truth(text: str) -> dict[str, Any]:
    category = next(c for c, openers in CATEGORIES.items() if any(text.startswith(o) for o in openers))
    return {"category": category, "urgent": any(u in text for u in URGENT)}


def parsed(text: str) -> Any:
    try:
        return json.loads(text.strip().removeprefix("```json").removesuffix("```"))
    except ValueError:
        return None


def cloud_answer(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    system = str(messages[0].get("content")) if messages else ""
    if "strict grader" in system:  # the default upstream judge asks the cloud to grade
        prompt = str(messages[-1]["content"])
        reference = prompt.split("Reference answer:\n", 1)[1].split("\n\nCandidate answer:", 1)[0]
        candidate = prompt.split("Candidate answer:\n", 1)[1].split("\n\nRate the candidate", 1)[0]
        score = 100 if parsed(reference) is not None and parsed(reference) == parsed(candidate) else 30
        return orjson.dumps({"similarity": score, "precision": score, "reason": "scripted"}).decode()
    return orjson.dumps(truth(str(messages[-1]["content"]))).decode()


def settings(data_dir: Path, cloud_url: str, port: int, min_samples: int) -> Settings:
    return Settings.model_validate(
        {
            "port": port,
            "data_dir": data_dir,
            "upstream": {"base_url": cloud_url, "api_key": "sk-gateway-own"},
            "local": {"enabled": True, "port": free_port()},
            # The default policy but min_samples; the default judge (upstream).
            "routes": [
                {
                    "name": ROUTE,
                    "match": ["gpt-4o-mini"],
                    "adapt": True,
                    "policy": {"min_samples": min_samples},
                }
            ],
        }
    )


def ask(client: openai.OpenAI, rng: random.Random) -> tuple[str, bool]:
    text, expected = ticket(rng)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        temperature=0,
    )
    answer = raw.parse().choices[0].message.content or ""
    return raw.headers.get("x-understudy-backend", "?"), parsed(answer) == expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-samples", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--next", type=int, default=300)
    parser.add_argument("--budget-s", type=float, default=3600)
    args = parser.parse_args()
    cloud = FakeCloudServer(FakeCloud(answer=cloud_answer, record=False)).start()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        app = create_app(settings(Path(tmp), cloud.base_url, port, args.min_samples))
        gateway = GatewayThread(app, port)
        gateway.start()
        try:
            report = run(
                app,
                openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-app", max_retries=0),
                args,
            )
        finally:
            gateway.stop()
            cloud.stop()
    print(json.dumps(report, indent=2))


def run(app: Any, client: openai.OpenAI, args: argparse.Namespace) -> dict[str, Any]:
    controller = app.services.controller
    backend = app.services.backend
    while backend is not None and not backend.healthy.is_set():
        time.sleep(0.5)
    rng = random.Random(1)
    started, sent = time.monotonic(), 0
    while controller.describe(ROUTE)["mode"] != "local":
        if time.monotonic() - started > args.budget_s:
            return {"promoted": False, "requests": sent, "state": controller.describe(ROUTE)}
        ask(client, rng)
        sent += 1
        time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
    promoted_after = time.monotonic() - started
    state = controller.describe(ROUTE)
    served = {"local": 0, "cloud": 0, "failover": 0}
    right = 0
    for _ in range(args.next):
        who, ok = ask(client, rng)
        served[who] = served.get(who, 0) + 1
        right += int(ok and who != "cloud")
    local = served["local"] + served["failover"]
    after = controller.describe(ROUTE)
    return {
        "promoted": True,
        "requests_to_promotion": sent,
        "seconds_to_promotion": round(promoted_after, 1),
        "training_jobs": sum(1 for h in state["history"] if h["to"] == "training"),
        "history": [f"{h['from']} -> {h['to']}: {h['reason']}" for h in state["history"]],
        "next": args.next,
        "served": served,
        "local_share": round(local / args.next, 3),
        "local_correct": f"{right}/{local}",
        "mode_after": after["mode"],
        "history_after": [
            f"{h['from']} -> {h['to']}: {h['reason']}" for h in after["history"][len(state["history"]) :]
        ],
    }


if __name__ == "__main__":
    main()
