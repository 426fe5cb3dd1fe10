"""Assemble a streamed answer (SSE) into the non-stream shape the log and the trainer use.

Handles chat completion chunks (content, tool calls, refusals, logprobs), legacy completion
chunks, and the Responses API (whose `response.completed` event carries the whole answer).
Anything else is kept as the list of its events.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

_MAX_RAW_EVENTS = 2000


class _Choice:
    __slots__ = ("content", "finish_reason", "logprobs", "refusal", "role", "text", "tool_calls")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: list[Any] | None = None


class StreamAssembler:
    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.done = False
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None
        self._response: dict[str, Any] | None = None
        self._raw: list[Any] = []
        self._object: str | None = None
        # `data:` payloads that were not JSON (nor [DONE]): a broken upstream on the OpenAI
        # endpoints, whose events are always JSON.
        self.invalid_events = 0

    def feed(self, events: bytes) -> None:
        """Consume complete SSE events (text ending in a blank line)."""
        for line in events.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
            elif data:
                self._event(data)

    def _event(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.invalid_events += 1
            self._keep_raw(data.decode("utf-8", "replace"))
            return
        if not isinstance(event, dict):
            self._keep_raw(event)
            return
        kind = event.get("object")
        if kind in ("chat.completion.chunk", "text_completion"):
            self._chunk(event, kind)
        elif isinstance(event.get("type"), str) and str(event["type"]).startswith("response."):
            self._responses_event(event)
        else:
            self._keep_raw(event)

    def _keep_raw(self, event: Any) -> None:
        if len(self._raw) < _MAX_RAW_EVENTS:
            self._raw.append(event)

    def _mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def _chunk(self, event: dict[str, Any], kind: str) -> None:
        self._object = kind
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if event.get(key) is not None:
                self._meta[key] = event[key]
        if event.get("usage"):
            self._usage = event["usage"]
        for delta_choice in event.get("choices") or ():
            self._choice_delta(delta_choice)

    def _choice_delta(self, payload: dict[str, Any]) -> None:
        choice = self._choices.setdefault(int(payload.get("index", 0)), _Choice())
        if payload.get("finish_reason"):
            choice.finish_reason = payload["finish_reason"]
        logprobs = payload.get("logprobs")
        if isinstance(logprobs, dict) and logprobs.get("content"):
            choice.logprobs = (choice.logprobs or []) + list(logprobs["content"])
        if payload.get("text"):
            choice.text.append(payload["text"])
            self._mark_first_token()
        delta = payload.get("delta") or {}
        if delta.get("role"):
            choice.role = delta["role"]
        if delta.get("content"):
            choice.content.append(delta["content"])
            self._mark_first_token()
        if delta.get("refusal"):
            choice.refusal.append(delta["refusal"])
            self._mark_first_token()
        for call in delta.get("tool_calls") or ():
            self._tool_call_delta(choice, call)

    def _tool_call_delta(self, choice: _Choice, call: dict[str, Any]) -> None:
        self._mark_first_token()
        slot = choice.tool_calls.setdefault(
            int(call.get("index", 0)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] += function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"] += function["arguments"]

    def _responses_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind.endswith(".delta"):
            self._mark_first_token()
        if kind in ("response.completed", "response.failed", "response.incomplete") and isinstance(
            event.get("response"), dict
        ):
            self._response = event["response"]
            self._usage = self._response.get("usage") or self._usage
            self.done = True

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    @property
    def finish_reasons(self) -> list[str | None]:
        return [choice.finish_reason for choice in self._choices.values()]

    def result(self) -> dict[str, Any]:
        """The answer in its non-stream shape."""
        if self._response is not None:
            return self._response
        if self._object == "chat.completion.chunk":
            return self._chat_result()
        if self._object == "text_completion":
            return self._completion_result()
        return {"object": "stream.events", "events": self._raw}

    def _chat_result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            message: dict[str, Any] = {"role": choice.role, "content": "".join(choice.content) or None}
            if choice.refusal:
                message["refusal"] = "".join(choice.refusal)
            if choice.tool_calls:
                message["tool_calls"] = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
            entry: dict[str, Any] = {
                "index": index,
                "message": message,
                "finish_reason": choice.finish_reason,
            }
            if choice.logprobs is not None:
                entry["logprobs"] = {"content": choice.logprobs}
            choices.append(entry)
        return {"object": "chat.completion", **self._meta, "choices": choices, "usage": self._usage}

    def _completion_result(self) -> dict[str, Any]:
        choices = [
            {"index": i, "text": "".join(c.text), "finish_reason": c.finish_reason}
            for i, c in sorted(self._choices.items())
        ]
        return {"object": "text_completion", **self._meta, "choices": choices, "usage": self._usage}
