"""What the gateway knows about one request as it goes: enough to answer and to log it."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.store.base import LogRecord

# Bodies beyond this are logged cut (and marked), so one huge request cannot bloat the store.
MAX_LOGGED_BODY = 1 << 20


# A random per-process prefix and a counter: unique across workers and restarts, without
# a getrandom() system call per request (1.3% of the gateway's CPU under load, py-spy).
_ID_PREFIX = ""
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = "req_" + os.urandom(6).hex()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker never repeats its parent's ids


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def loggable_body(raw: bytes, content_type: str) -> str | None:
    if not raw:
        return None
    if "json" not in content_type and raw[:1] not in (b"{", b"["):
        return orjson.dumps({"content_type": content_type, "bytes": len(raw)}).decode()
    text = raw[:MAX_LOGGED_BODY].decode("utf-8", "replace")
    return text if len(raw) <= MAX_LOGGED_BODY else orjson.dumps({"truncated": True, "text": text}).decode()


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from chat/completions (`prompt_tokens`) or Responses
    (`input_tokens`) usage blocks."""
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if isinstance(prompt, int) else None, completion if isinstance(completion, int) else None)


@dataclass(slots=True)
class Exchange:
    method: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    ts: float = field(default_factory=time.time)
    request_id: str = field(default_factory=new_request_id)
    route: str = "default"
    backend: str = "cloud"
    model: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    status: int = 0
    outcome: str = "ok"
    request_text: str | None = None
    response_text: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    first_token_at: float | None = None
    # The parsed request and answer (JSON endpoints), for the learning cycle; never logged twice.
    request_body: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    client: str | None = None
    # user: client traffic; judge / shadow: the gateway's own calls.
    kind: str = "user"
    # Why the local model did not answer a request on a locally served route (an eligibility
    # reason, or `fallback:<why>` when it failed before its first byte).
    local_skip: str | None = None
    # The client's credentials, for the gateway's own calls about this request (a spot check,
    # its judge): held in memory for the life of that work only, never logged or stored.
    authorization: str | None = None
    # The response's status line went out: an error now can only end its body.
    response_started: bool = False
    # OpenAI's x-ratelimit-* headers, set when a configured limit applied to this request.
    limit_headers: list[tuple[bytes, bytes]] | None = None
    # Settles the rate-limit charge on the real usage (set by the limits guard).
    settle: Callable[[], Awaitable[None]] | None = None

    def gateway_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"x-request-id", self.request_id.encode()),
            (b"x-understudy-route", self.route.encode()),
            (b"x-understudy-backend", self.backend.encode()),
        ]
        return headers if self.limit_headers is None else headers + self.limit_headers

    @property
    def latency_s(self) -> float:
        return time.perf_counter() - self.started

    def record(self) -> LogRecord:
        prompt, completion = usage_tokens(self.usage)
        ttft = None if self.first_token_at is None else (self.first_token_at - self.started) * 1000
        return LogRecord(
            request_id=self.request_id,
            ts=self.ts,
            route=self.route,
            backend=self.backend,
            endpoint=self.endpoint,
            method=self.method,
            status=self.status,
            outcome=self.outcome,
            stream=self.stream,
            model=self.model,
            upstream_model=self.upstream_model,
            latency_ms=round(self.latency_s * 1000, 3),
            ttft_ms=None if ttft is None else round(ttft, 3),
            prompt_tokens=prompt,
            completion_tokens=completion,
            request=self.request_text,
            response=self.response_text,
            usage=None if self.usage is None else orjson.dumps(self.usage).decode(),
            error=self.error,
            client=self.client,
            kind=self.kind,
            local_skip=self.local_skip,
        )
