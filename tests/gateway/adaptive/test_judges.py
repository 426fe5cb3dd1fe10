"""Judges: offline ones directly, the upstream grader against the real fake cloud."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.adaptive.judges import (
    EmbeddingJudge,
    ExactJudge,
    JsonEqualJudge,
    JudgeError,
    UpstreamJudge,
)
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def chat(text: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


async def test_exact_judge() -> None:
    judge = ExactJudge(threshold=100)
    assert (await judge.judge(REQUEST, chat("Paris"), chat(" Paris "))).passed
    verdict = await judge.judge(REQUEST, chat("Paris"), chat("Lyon"))
    assert not verdict.passed and verdict.score == 0


async def test_json_equal_judge() -> None:
    judge = JsonEqualJudge(threshold=100)
    assert (
        await judge.judge(REQUEST, chat('{"a": 1, "b": [2]}'), chat('```json\n{"b":[2],"a":1}\n```'))
    ).passed
    assert not (await judge.judge(REQUEST, chat('{"a": 1}'), chat('{"a": 2}'))).passed
    assert not (await judge.judge(REQUEST, chat('{"a": 1}'), chat("not json"))).passed
    with pytest.raises(JudgeError):
        await judge.judge(REQUEST, chat("prose"), chat("{}"))


async def test_embedding_judge_separates_paraphrase_from_unrelated() -> None:
    judge = EmbeddingJudge(threshold=80)
    close = await judge.judge(
        REQUEST, chat("The capital of France is Paris."), chat("Paris is the capital city of France.")
    )
    far = await judge.judge(
        REQUEST, chat("The capital of France is Paris."), chat("Bananas are rich in potassium.")
    )
    assert close.passed and close.score > 85
    assert not far.passed and far.score < 40


def _grader_cloud(replies: list[str]) -> FakeCloud:
    queue = list(replies)
    return FakeCloud(answer=lambda body: queue.pop(0) if queue else "still not json")


async def _call(server: FakeCloudServer) -> Any:
    async def call(body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(server.base_url + "/chat/completions", json=body) as r,
        ):
            return dict(orjson.loads(await r.read()))

    return call


async def test_upstream_judge_parses_and_retries() -> None:
    server = FakeCloudServer(
        _grader_cloud(["oops", '{"similarity": 90, "precision": 75, "reason": "close"}'])
    ).start()
    try:
        judge = UpstreamJudge(threshold=70, model="gpt-4o-mini", call=await _call(server))
        verdict = await judge.judge(REQUEST, chat("Paris"), chat("Paris, France"))
        assert verdict.scores == {"similarity": 90.0, "precision": 75.0}
        assert verdict.passed and verdict.reason == "close"
        sent = server.cloud.requests[-1].json()
        assert sent["response_format"]["type"] == "json_schema"
        assert "Paris, France" in sent["messages"][1]["content"]
        assert len(server.cloud.requests) == 2  # one retry after the unparsable reply
    finally:
        server.stop()


async def test_upstream_judge_gives_up_with_judge_error_not_a_fail() -> None:
    server = FakeCloudServer(_grader_cloud([])).start()
    try:
        judge = UpstreamJudge(threshold=70, model="gpt-4o-mini", call=await _call(server), attempts=2)
        with pytest.raises(JudgeError):
            await judge.judge(REQUEST, chat("Paris"), chat("Paris"))
    finally:
        server.stop()
