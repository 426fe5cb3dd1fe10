"""A small aiohttp client for the limits tests: one chat call, and a client that keeps a
gateway saturated on a manual clock (retrying exactly when told) for simulated time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.limits.clock import ManualClock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def used_tokens(self) -> int:
        return int(self.body["usage"]["total_tokens"])


async def chat(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str | None = None,
    *,
    model: str = "gpt-4o-mini",
    content: str = "hello",
    **fields: Any,
) -> Reply:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    async with session.post(base_url + "/v1/chat/completions", json=body, headers=headers) as response:
        payload = await response.json(content_type=None)
        return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, payload)


@dataclass
class Saturation:
    admitted: list[Reply] = field(default_factory=list)
    refused: int = 0

    @property
    def tokens(self) -> int:
        return sum(reply.used_tokens for reply in self.admitted)


async def saturate(
    session: aiohttp.ClientSession,
    urls: list[str],
    key: str | None,
    clock: ManualClock,
    seconds: float,
    **fields: Any,
) -> Saturation:
    """Send back to back (round-robin over `urls`) for `seconds` of the manual clock; on a
    429, move the clock by the gateway's `retry-after-ms` and try again."""
    result = Saturation()
    end = clock.time() + seconds
    turn = 0
    while clock.time() < end:
        reply = await chat(session, urls[turn % len(urls)], key, **fields)
        turn += 1
        if reply.status == 200:
            result.admitted.append(reply)
            continue
        assert reply.status == 429, reply.body
        result.refused += 1
        clock.advance(int(reply.headers["retry-after-ms"]) / 1000)
    return result
