"""What the controller's evaluations are made of: held-out samples read back, the local
answer's token budget, and the record each judged comparison leaves in the store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gateway.adaptive.answers import answer_text
from gateway.adaptive.judges import Verdict
from gateway.store.base import EvalRecord

if TYPE_CHECKING:
    from gateway.adaptive.controller import RouteRuntime

# A shadow or held-out local answer never gets more tokens than this.
LOCAL_MAX_TOKENS = 1024
# What a held-out sample replays from the request it was logged with.
REPLAYED_FIELDS = ("tools", "tool_choice", "response_format", "parallel_tool_calls")


def eval_max_tokens(request: dict[str, Any], cloud: dict[str, Any]) -> int:
    """The local answer's token budget: the request's own, else room for an answer half again
    as long as the cloud's, counted in tokens (its usage, else a conservative estimate from
    the text, tool calls included), never in characters: JSON tokenizes denser than prose,
    and a near miss cut mid-object would be judged a total miss."""
    asked = request.get("max_completion_tokens") or request.get("max_tokens")
    if isinstance(asked, int) and asked > 0:
        return min(asked, LOCAL_MAX_TOKENS)
    usage = cloud.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or tokens <= 0:
        tokens = len(answer_text(cloud)) // 2  # ~2 characters a token even for dense JSON
    return min(LOCAL_MAX_TOKENS, max(32, int(tokens * 1.5) + 16))


def read_heldout(path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Held-out samples as (request, the cloud's answer): the chat up to its last turn, with
    the fields the original request carried, and that last turn as the reference answer."""
    if not path.is_file():
        return []
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        sample = orjson.loads(line) if line.strip() else None
        if not isinstance(sample, dict):
            continue
        messages = sample.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            continue
        # `weight` marks turns the trainer did not learn from; it is not an OpenAI field.
        prompt = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:-1]]
        request = {"messages": prompt, **{k: sample[k] for k in REPLAYED_FIELDS if k in sample}}
        if isinstance(sample.get("model"), str):
            request["model"] = sample["model"]
        answer = messages[-1]
        finish = "tool_calls" if answer.get("tool_calls") else "stop"
        cloud: dict[str, Any] = {"choices": [{"index": 0, "message": answer, "finish_reason": finish}]}
        if isinstance(sample.get("completion_tokens"), int):
            cloud["usage"] = {"completion_tokens": sample["completion_tokens"]}
        samples.append((request, cloud))
    return samples


def eval_record(
    runtime: RouteRuntime,
    phase: str,
    version: int,
    request: dict[str, Any],
    cloud: dict[str, Any],
    local: dict[str, Any] | None,
    verdict: Verdict | None,
    error: str | None,
    latency_ms: float,
) -> EvalRecord:
    return EvalRecord(
        ts=time.time(),
        route=runtime.name,
        adapter_version=version,
        phase=phase,
        judge=runtime.judge.name,
        passed=None if verdict is None else verdict.passed,
        score=None if verdict is None else verdict.score,
        scores=None if verdict is None else orjson.dumps(verdict.scores).decode(),
        prompt=orjson.dumps(request.get("messages", request)).decode(),
        cloud_answer=orjson.dumps(answer_text(cloud)).decode(),
        local_answer=None if local is None else orjson.dumps(answer_text(local)).decode(),
        reason=None if verdict is None else verdict.reason,
        error=error,
        latency_ms=round(latency_ms, 1),
    )
