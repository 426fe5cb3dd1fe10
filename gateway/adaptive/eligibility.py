"""Which requests the local model can answer as well as the cloud would.

The local model is a small text-only chat model with a short context, trained on one route's
traffic. A request it cannot serve properly goes to the cloud, with a reason that is logged
and counted; the reasons are a small fixed set, so they are safe as metric labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Request fields the local backend honours (or that do not change the answer). Anything else
# (logprobs, audio, modalities, prediction, web search, legacy functions...) would come back
# silently ignored or as a null, so the cloud answers it.
LOCAL_PARAMETERS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "metadata",
        "store",
        "service_tier",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        # vLLM's sampling extensions, which the local backend (and vLLM) honour
        "ignore_eos",
        "min_tokens",
    }
)
# Falsy values of these mean "off": `logprobs: false` is as good as absent.
_OFF_WHEN_FALSY = frozenset({"logprobs", "top_logprobs"})
# A conservative characters-per-token for prompts: small models' tokenizers split finer than
# OpenAI's, and an estimate that errs long only sends a borderline request to the cloud.
_CHARS_PER_TOKEN = 3.0
# What a request asks for when it names no max_tokens: room for an answer of this size.
_DEFAULT_ANSWER_TOKENS = 256

NON_TEXT_CONTENT = "non_text_content"
UNSUPPORTED_PARAMETER = "unsupported_parameter"
CONTEXT_LENGTH = "context_length"
TOOLS_MISMATCH = "tools_mismatch"
BACKEND_DOWN = "backend_down"
REASONS = (NON_TEXT_CONTENT, UNSUPPORTED_PARAMETER, CONTEXT_LENGTH, TOOLS_MISMATCH, BACKEND_DOWN)


@dataclass(frozen=True, slots=True)
class AdapterTraits:
    """What an adapter was trained on, as far as eligibility cares (from its meta.json)."""

    trained_with_tools: bool = False


def ineligible_reason(body: dict[str, Any], traits: AdapterTraits, context_tokens: int | None) -> str | None:
    """Why the local model should not answer this chat request, or None when it may."""
    if _has_non_text_content(body.get("messages")):
        return NON_TEXT_CONTENT
    if _unsupported_parameter(body) is not None:
        return UNSUPPORTED_PARAMETER
    if offers_tools(body) != traits.trained_with_tools:
        return TOOLS_MISMATCH
    if context_tokens is not None and estimated_tokens(body) > context_tokens:
        return CONTEXT_LENGTH
    return None


def offers_tools(body: dict[str, Any]) -> bool:
    """True when the request lets the model call a tool (tools given, tool_choice not none)."""
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def _has_non_text_content(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content
        ):
            return True
    return False


def _unsupported_parameter(body: dict[str, Any]) -> str | None:
    for name, value in body.items():
        if name in LOCAL_PARAMETERS or (name in _OFF_WHEN_FALSY and not value):
            continue
        return name
    return None


def estimated_tokens(body: dict[str, Any]) -> int:
    """Prompt (estimated from its characters) plus the answer's budget."""
    prompt = math.ceil(len(_prompt_chars(body)) / _CHARS_PER_TOKEN)
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    answer = asked if isinstance(asked, int) and asked > 0 else _DEFAULT_ANSWER_TOKENS
    return prompt + answer


def _prompt_chars(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            content = message.get("content")
            parts.append(content if isinstance(content, str) else str(content or ""))
            if message.get("tool_calls"):
                parts.append(str(message["tool_calls"]))
    if body.get("tools"):
        parts.append(str(body["tools"]))
    return "".join(parts)
