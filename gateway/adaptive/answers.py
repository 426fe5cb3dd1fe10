"""Text views of OpenAI-shaped requests and answers, for judging and display."""

from __future__ import annotations

from typing import Any

import orjson


def answer_text(answer: dict[str, Any]) -> str:
    """The assistant's answer as text: message content, tool calls as JSON, a completion's
    text, or a Responses API output."""
    choices = answer.get("choices")
    if isinstance(choices, list) and choices:
        first = choices[0] if isinstance(choices[0], dict) else {}
        message = first.get("message") or {}
        if message.get("tool_calls"):
            calls = [
                {
                    "name": c.get("function", {}).get("name"),
                    "arguments": _arguments(c.get("function", {}).get("arguments")),
                }
                for c in message["tool_calls"]
            ]
            return orjson.dumps(calls).decode()
        if isinstance(message.get("content"), str):
            return str(message["content"])
        return str(first.get("text") or "")
    if isinstance(answer.get("output_text"), str):
        return str(answer["output_text"])
    parts = [
        part.get("text", "")
        for item in answer.get("output") or []
        if isinstance(item, dict)
        for part in item.get("content") or []
        if isinstance(part, dict)
    ]
    return "".join(parts)


def _arguments(raw: Any) -> Any:
    """A tool call's arguments parsed, so that equal calls compare equal however spaced."""
    if not isinstance(raw, str):
        return raw
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_text(request: dict[str, Any]) -> str:
    """The conversation a request carries, one `role: text` line per message."""
    messages = request.get("messages")
    if isinstance(messages, list):
        return "\n".join(
            f"{m.get('role', 'user')}: {_content_text(m.get('content'))}"
            for m in messages
            if isinstance(m, dict)
        )
    prompt = request.get("prompt", request.get("input", ""))
    return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
