"""Token estimates for TPM, made before the call and settled on the answer's real usage.

The estimate is deliberately cheap (no tokenizer on the hot path): prompt text at ~4
characters a token, plus the completion budget the request asks for (`max_tokens`, ...)
times `n`, as OpenAI's own limiter counts it.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.domain.exchange import usage_tokens

CHARS_PER_TOKEN = 4
# Completion budget assumed when a generating request names none; settled afterwards.
DEFAULT_COMPLETION_TOKENS = 256
GENERATING_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# The most any model writes per choice, and OpenAI's largest `n`: a client's absurd
# max_tokens must not fill a shared bucket for years when its answer reports no usage.
MAX_COMPLETION_TOKENS = 131_072
MAX_N = 128
_BUDGET_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_TEXT_FIELDS = ("messages", "prompt", "input", "instructions")


def _chars(value: Any) -> int:
    """Characters of text in a request field. Iterative: the client chooses how deep it nests."""
    total = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending += (item.get("content"), item.get("text"))
    return total


def _completion_budget(body: dict[str, Any]) -> int:
    budget = next(
        (body[f] for f in _BUDGET_FIELDS if isinstance(body.get(f), int)), DEFAULT_COMPLETION_TOKENS
    )
    n = body.get("n")
    return min(max(0, budget), MAX_COMPLETION_TOKENS) * (min(n, MAX_N) if isinstance(n, int) and n > 1 else 1)


def estimate_tokens(endpoint: str, body: dict[str, Any] | None) -> int:
    if not body:
        return 0
    prompt = math.ceil(sum(_chars(body.get(f)) for f in _TEXT_FIELDS) / CHARS_PER_TOKEN)
    if endpoint not in GENERATING_ENDPOINTS:
        return prompt
    return prompt + _completion_budget(body)


def used_tokens(usage: dict[str, Any] | None) -> int | None:
    """Tokens an answer really used (prompt + completion), None when it did not say."""
    prompt, completion = usage_tokens(usage)
    if prompt is None and completion is None:
        return None
    return (prompt or 0) + (completion or 0)
