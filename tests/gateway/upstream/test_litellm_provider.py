"""A non-OpenAI provider through litellm: the client speaks OpenAI, the upstream Anthropic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer


class FakeAnthropic(FakeCloud):
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.messages)
        return app

    async def messages(self, request: web.Request) -> web.Response:
        _, body = await self._seen(request)
        text = body["messages"][-1]["content"]
        if isinstance(text, list):
            text = text[0]["text"]
        if "overloaded" in text:
            return web.json_response(
                {"type": "error", "error": {"type": "invalid_request_error", "message": "bad thing"}},
                status=400,
            )
        return web.json_response(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": f"claude says: {text}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 7, "output_tokens": 3},
            }
        )


@pytest.fixture
def anthropic() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeAnthropic()).start()
    yield server
    server.stop()


def test_chat_through_litellm_translation(gateway_factory: Any, anthropic: FakeCloudServer) -> None:
    gateway = gateway_factory(
        upstreams={
            "claude": {
                "provider": "litellm",
                "model_prefix": "anthropic/",
                "base_url": f"http://127.0.0.1:{anthropic.port}",
                "api_key": "sk-ant-secret",
            }
        },
        routes=[{"name": "claude", "match": ["claude-*"], "upstream": "claude"}],
    )
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0)
    completion = client.chat.completions.create(
        model="claude-3-5-haiku", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert completion.choices[0].message.content == "claude says: hi"
    assert completion.usage.prompt_tokens == 7
    seen = anthropic.cloud.requests[-1]
    assert seen.path.endswith("/messages")
    assert orjson.loads(seen.body)["model"] == "claude-3-5-haiku"
    assert seen.headers["x-api-key"] == "sk-ant-secret"
    (record,) = gateway.wait_for_records(1)
    assert record["route"] == "claude" and record["completion_tokens"] == 3
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="claude-3-5-haiku", messages=[{"role": "user", "content": "overloaded"}], max_tokens=5
        )
