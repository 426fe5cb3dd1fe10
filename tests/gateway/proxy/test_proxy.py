"""The transparent proxy, driven by the official openai SDK against a real fake cloud."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from gateway.demo.fakecloud import FakeCloudServer


def test_chat_completion_passes_through(client: Any, fake_cloud: FakeCloudServer) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.usage.completion_tokens == 3
    assert raw.headers["x-understudy-route"] == "default"
    assert raw.headers["x-understudy-backend"] == "cloud"
    assert raw.headers["x-request-id"].startswith("req_")
    # upstream response headers come back untouched
    assert raw.headers["openai-processing-ms"] == "1"


def test_streaming_forwards_chunks_and_usage(client: Any) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four"
    assert len(chunks) >= 6  # role, 5 words, finish, usage: not buffered into one
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_tools_and_response_format_reach_upstream_untouched(client: Any, fake_cloud: FakeCloudServer) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    completion = client.chat.completions.create(
        model="tool-model",
        messages=[{"role": "user", "content": "find cats"}],
        tools=tools,
        tool_choice="auto",
        response_format=schema,
        n=1,
        logprobs=False,
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"query": "find cats"}
    sent = fake_cloud.cloud.requests[-1].json()
    assert sent["tools"] == tools
    assert sent["response_format"] == schema
    assert sent["tool_choice"] == "auto"


def test_streamed_tool_calls_assemble_in_log(client: Any, gateway: Any) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    chunks = list(
        client.chat.completions.create(
            model="tool-model", messages=[{"role": "user", "content": "q"}], tools=tools, stream=True
        )
    )
    assert chunks
    (record,) = gateway.wait_for_records(1)
    message = record["response"]["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"query":"q"}'}
    assert record["response"]["choices"][0]["finish_reason"] == "tool_calls"


def test_unknown_fields_pass_through(client: Any, fake_cloud: FakeCloudServer) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"my_vendor_field": {"deep": [1, 2, 3]}, "seed": 7},
    )
    sent = fake_cloud.cloud.requests[-1]
    assert sent.json()["my_vendor_field"] == {"deep": [1, 2, 3]}
    assert sent.json()["seed"] == 7


def test_embeddings_models_completions_responses(client: Any) -> None:
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8
    models = client.models.list()
    assert "gpt-4o-mini" in [m.id for m in models.data]
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    assert completion.choices[0].text == "echo: say hi"
    response = client.responses.create(model="gpt-4o-mini", input="hello responses")
    assert response.output_text == "echo: hello responses"


def test_responses_stream_assembled(client: Any, gateway: Any) -> None:
    events = list(client.responses.create(model="gpt-4o-mini", input="streamed words here", stream=True))
    assert events[-1].type == "response.completed"
    (record,) = gateway.wait_for_records(1)
    assert record["stream"] is True
    assert record["response"]["output"][0]["content"][0]["text"] == "echo: streamed words here"
    assert record["prompt_tokens"] == 3


def test_other_v1_paths_pass_through(gateway: Any) -> None:
    import urllib.request

    request = urllib.request.Request(gateway.url + "/v1/files/file-123/content?purpose=x", method="GET")
    with urllib.request.urlopen(request) as response:
        body = json.loads(response.read())
    assert body["path"] == "/v1/files/file-123/content"
    assert body["query"] == "purpose=x"


def test_upstream_error_status_and_body_kept(client: Any, gateway: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="error-400", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 400
    assert caught.value.body["code"] == "fake_400"
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="error-429", messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "1"
    records = gateway.wait_for_records(2)
    assert sorted(r["status"] for r in records) == [400, 429]
    assert all(r["outcome"] == "error" for r in records)


def test_client_authorization_forwarded_without_upstream_key(
    client: Any, fake_cloud: FakeCloudServer
) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert fake_cloud.cloud.requests[-1].headers["Authorization"] == "Bearer sk-client-secret-123"


def test_configured_upstream_key_replaces_client_key(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(upstream={"base_url": fake_cloud.base_url, "api_key": "sk-upstream-777"})
    local = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-xyz", max_retries=0)
    local.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-Understudy-Route": "default", "X-Custom": "kept"},
    )
    headers = fake_cloud.cloud.requests[-1].headers
    assert headers["Authorization"] == "Bearer sk-upstream-777"
    assert headers["X-Custom"] == "kept"
    assert not any(name.lower().startswith("x-understudy") for name in headers)


def test_routes_match_by_model_glob_header_and_rewrite(
    gateway_factory: Any, fake_cloud: FakeCloudServer
) -> None:
    gateway = gateway_factory(
        routes=[
            {"name": "support", "match": ["support-*"], "upstream_model": "gpt-4o-mini"},
            {"name": "exact", "match": ["gpt-4o"]},
        ]
    )
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="k", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="support-v2", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-understudy-route"] == "support"
    assert fake_cloud.cloud.requests[-1].json()["model"] == "gpt-4o-mini"
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-understudy-route"] == "exact"
    raw = c.chat.completions.with_raw_response.create(
        model="other",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-Understudy-Route": "support"},
    )
    assert raw.headers["x-understudy-route"] == "support"
    raw = c.chat.completions.with_raw_response.create(
        model="other", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-understudy-route"] == "default"
    records = gateway.wait_for_records(4)
    assert {r["route"] for r in records} == {"support", "exact", "default"}
    support = next(r for r in records if r["model"] == "support-v2")
    assert support["upstream_model"] == "gpt-4o-mini"


async def _post(
    url: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers=headers or {}) as response,
    ):
        headers = {str(k).lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.json(content_type=None)


async def test_invalid_json_is_400(gateway: Any) -> None:
    status, headers, body = await _post(
        gateway.url + "/v1/chat/completions",
        b'{"model": "x", "messages": [',
        {"content-type": "application/json"},
    )
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_json"
    assert headers["x-request-id"].startswith("req_")


async def test_unknown_route_header_is_400(gateway: Any) -> None:
    status, _, body = await _post(
        gateway.url + "/v1/chat/completions",
        b'{"model": "x", "messages": []}',
        {"content-type": "application/json", "x-understudy-route": "nope"},
    )
    assert status == 400 and body["error"]["code"] == "unknown_route"


async def test_body_over_limit_is_413(gateway_factory: Any) -> None:
    gateway = gateway_factory(max_body_bytes=1000)
    big = json.dumps({"model": "x", "messages": [{"role": "user", "content": "a" * 2000}]}).encode()
    status, _, body = await _post(
        gateway.url + "/v1/chat/completions", big, {"content-type": "application/json"}
    )
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # still serving
    status, _, _ = await _post(
        gateway.url + "/v1/chat/completions",
        b'{"model":"x","messages":[{"role":"user","content":"hi"}]}',
        {"content-type": "application/json"},
    )
    assert status == 200


def test_upstream_unreachable_is_502(gateway_factory: Any) -> None:
    with socket_closed_port() as port:
        gateway = gateway_factory(upstream={"base_url": f"http://127.0.0.1:{port}/v1"})
        c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            c.chat.completions.create(model="x", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"
    # why, but not where: the upstream's address is not the client's business
    assert "Connection refused" in caught.value.message
    assert "127.0.0.1" not in caught.value.message and str(port) not in caught.value.message


def test_upstream_dropped_connection_is_502(client: Any) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="drop", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502


def test_upstream_timeout_is_504(gateway_factory: Any, fake_cloud: FakeCloudServer) -> None:
    gateway = gateway_factory(upstream={"base_url": fake_cloud.base_url, "read_timeout_s": 0.3})
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        c.chat.completions.create(model="slow-2000", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 504
    assert caught.value.body["type"] == "timeout_error"
    (record,) = gateway.wait_for_records(1)
    assert record["status"] == 504 and record["outcome"] == "error"


def test_malformed_upstream_json_becomes_502_and_is_logged(client: Any, gateway: Any) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="garbage", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_invalid_response"
    (record,) = gateway.wait_for_records(1)
    assert record["outcome"] == "error" and record["status"] == 502
    assert record["response"] == '{"choices": ['  # kept as it came, for diagnosis
    assert "not valid JSON" in record["error"]


class socket_closed_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        return None


async def test_an_unexpected_exception_is_an_openai_500_and_still_a_record(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug planted in the request path: the client gets OpenAI's error shape (not
    uvicorn's plain-text 500), the traceback is logged, and the request is recorded."""

    def planted(*args: Any) -> None:
        raise RuntimeError("planted bug")

    gateway.app.services.dispatcher.plan = planted
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    status, headers, answer = await _post(
        gateway.url + "/v1/chat/completions", body, {"content-type": "application/json"}
    )
    assert status == 500
    assert answer["error"]["type"] == "internal_error" and "planted" not in answer["error"]["message"]
    assert "planted bug" in caplog.text and "Traceback" in caplog.text
    (record,) = gateway.wait_for_records(1)
    assert record["status"] == 500 and record["outcome"] == "error"
    assert record["request_id"] == headers["x-request-id"]
