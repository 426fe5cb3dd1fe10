"""Synthetic training data for thin routes (LlamaDuo's answer to "too little traffic").

When a route has at least `seed_samples` real pairs but fewer than `min_samples`, the route's
own cloud model is shown a few sampled real prompts and asked to write new ones in the same
style and distribution (several per call); it then answers each new prompt exactly as it
answers users. Near-duplicates of any real prompt are dropped (every real prompt may end up
held out, and the judge only ever grades real traffic), as are repeats among the new ones.
Spend stops at `max_cost_usd` for the route, counted across restarts.

Calls are logged: the prompt-writing ones as kind `synthetic_prompts`, the answered prompts
as kind `synthetic` (those are the training pairs; the trainer never holds them out).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.adaptive.answers import answer_text
from gateway.adaptive.policy import RouteState
from gateway.errors import GatewayError
from gateway.settings import PolicySettings, SyntheticSettings
from gateway.store.base import Store

log = logging.getLogger("understudy.synthetic")

# (body, kind) → the cloud's answer; raises GatewayError
CloudCall = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
Price = Callable[[dict[str, Any]], float]

SHINGLE = 4
# Two prompts whose character 4-gram Jaccard similarity reaches this are the same prompt.
NEAR_DUPLICATE = 0.8
SEEDS_PER_CALL = 5
# Calls in a row that add nothing new before the generator gives up (the model repeats).
MAX_BARREN_CALLS = 3
_WRITER = (
    "You write realistic new user messages for an assistant, for testing it. You are shown real "
    "messages its users sent. Write {count} new messages of the same kind: the same task, style, "
    "length and variety of content, but not copies or paraphrases of the examples. Reply with a "
    "JSON array of {count} strings and nothing else."
)
_STREAM_ONLY = ("stream", "stream_options")


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def shingles(text: str) -> frozenset[str]:
    text = normalized(text)
    return frozenset(text[i : i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1)))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else float(a == b)


def last_user_text(request: dict[str, Any]) -> str | None:
    for message in reversed(request.get("messages") or []):
        if (
            isinstance(message, dict)
            and message.get("role") == "user"
            and isinstance(message.get("content"), str)
        ):
            return str(message["content"])
    return None


def with_prompt(seed: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The seed request (its system prompt, tools, response format, model) asking `prompt`."""
    messages = list(seed.get("messages") or [])
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            messages[i] = {**messages[i], "content": prompt}
            break
    body = {k: v for k, v in seed.items() if k not in _STREAM_ONLY}
    body["messages"] = messages
    return body


def parse_prompts(answer: dict[str, Any]) -> list[str]:
    """The new prompts in the writer's answer (a JSON array of strings, fences tolerated)."""
    text = answer_text(answer).strip()
    match = re.search(r"\[.*\]", text, re.DOTALL)
    if match is None:
        return []
    try:
        value = json.loads(match.group(0))
    except json.JSONDecodeError:
        return []
    return (
        [item.strip() for item in value if isinstance(item, str) and item.strip()]
        if isinstance(value, list)
        else []
    )


@dataclass
class Outcome:
    added: int = 0
    calls: int = 0
    spent_usd: float = 0.0
    dropped: int = 0
    stopped: str = ""
    prompts: list[str] = field(default_factory=list)


@dataclass
class Synthesizer:
    """One generation run for a route: `seeds` are real requests (their last user message is
    the example), `known` every real prompt the route has (nothing close to one is kept)."""

    settings: SyntheticSettings
    cloud: CloudCall
    price: Price
    seeds: list[dict[str, Any]]
    known: list[str]
    spent_before: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    async def run(self, wanted: int) -> Outcome:
        outcome = Outcome()
        seen = [shingles(text) for text in self.known]
        barren = 0
        while outcome.added < wanted:
            if self.spent_before + outcome.spent_usd >= self.settings.max_cost_usd:
                outcome.stopped = f"cost cap ${self.settings.max_cost_usd:g} reached"
                break
            if barren >= MAX_BARREN_CALLS:
                outcome.stopped = f"{barren} calls in a row wrote nothing new"
                break
            fresh = await self._write(outcome, seen, wanted - outcome.added)
            barren = 0 if fresh else barren + 1
            for prompt in fresh:
                if outcome.added >= wanted or not await self._answer(outcome, prompt):
                    break
        outcome.stopped = outcome.stopped or f"{outcome.added} new pairs"
        return outcome

    async def _write(self, outcome: Outcome, seen: list[frozenset[str]], missing: int) -> list[str]:
        examples = self.rng.sample(self.seeds, min(SEEDS_PER_CALL, len(self.seeds)))
        count = min(self.settings.per_call, missing)
        body = {
            "model": examples[0].get("model"),
            "temperature": self.settings.temperature,
            "messages": [
                {"role": "system", "content": _WRITER.format(count=count)},
                {"role": "user", "content": "\n\n".join(f"Example: {last_user_text(s)}" for s in examples)},
            ],
        }
        answer = await self._call(outcome, body, "synthetic_prompts")
        fresh = []
        for prompt in parse_prompts(answer) if answer else []:
            grams = shingles(prompt)
            if any(similarity(grams, other) >= NEAR_DUPLICATE for other in seen):
                outcome.dropped += 1
                continue
            seen.append(grams)
            fresh.append(prompt)
        return fresh

    async def _answer(self, outcome: Outcome, prompt: str) -> bool:
        if self.spent_before + outcome.spent_usd >= self.settings.max_cost_usd:
            return False
        seed = self.rng.choice(self.seeds)
        if await self._call(outcome, with_prompt(seed, prompt), "synthetic") is None:
            return False
        outcome.added += 1
        outcome.prompts.append(prompt)
        return True

    async def _call(self, outcome: Outcome, body: dict[str, Any], kind: str) -> dict[str, Any] | None:
        outcome.calls += 1
        try:
            answer = await self.cloud(body, kind)
        except GatewayError as exc:
            log.warning("synthetic %s call failed: %s", kind, exc.message)
            return None
        outcome.spent_usd += self.price(answer)
        return answer


def pairs_wanted(policy: PolicySettings, state: RouteState, real: int, made: int) -> int:
    """How many synthetic pairs a route in `cloud` should get now (0: none)."""
    settings = policy.synthetic
    ready = settings.enabled and state.mode == "cloud" and real >= settings.seed_samples
    if not ready or state.synthetic_spent_usd >= settings.max_cost_usd:
        return 0
    return max(0, (settings.target_samples or policy.min_samples) - real - made)


def real_requests(store: Store, route: str, limit: int = 2000) -> tuple[list[dict[str, Any]], list[str]]:
    """(seed requests, every real prompt) from the route's usable user traffic, newest last."""
    seeds: list[dict[str, Any]] = []
    for record in store.iter_records(route=route, kind="user"):
        request = record.get("request")
        usable = (
            record.get("status") == 200 and record.get("outcome") == "ok" and record.get("backend") == "cloud"
        )
        if usable and isinstance(request, dict) and last_user_text(request):
            seeds.append(request)
    seeds = seeds[-limit:]
    return seeds, [text for text in (last_user_text(seed) for seed in seeds) if text]


def synthetic_pairs(store: Store, route: str, after_id: int) -> tuple[int, int]:
    """(answered synthetic pairs after `after_id`, the newest one's id or `after_id`)."""
    count, newest = 0, after_id
    for record in store.iter_records(route=route, since_id=after_id, kind="synthetic"):
        if record.get("status") == 200:
            count, newest = count + 1, max(newest, int(record["id"]))
    return count, newest
