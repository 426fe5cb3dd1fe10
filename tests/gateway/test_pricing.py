"""Prices: cached prompt tokens at the cached rate, and `pricing:` in gateway.yaml for models
litellm's map does not know (or at a negotiated rate), exact to the cent's billionth."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.pricing import ModelPrice, PriceBook, cached_tokens
from gateway.settings import ConfigError, PriceSettings, load_settings
from tests.gateway.test_metrics import labels, scrape

USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 600},
}


def test_cached_prompt_tokens_are_priced_at_the_maps_cached_rate() -> None:
    mini = PriceBook().price("gpt-4o-mini")
    assert mini is not None and mini.cached_input_per_token == 7.5e-08
    expected = 400 * 1.5e-07 + 600 * 7.5e-08 + 200 * 6e-07
    assert mini.cost(1000, 200, cached_tokens(USAGE)) == pytest.approx(expected, rel=1e-12)
    assert mini.cost(1000, 200) == pytest.approx(1000 * 1.5e-07 + 200 * 6e-07, rel=1e-12)
    # No cached rate known: cached tokens cost the full input price.
    assert ModelPrice(1e-6, 2e-6).cost(1000, 0, 600) == pytest.approx(1e-3, rel=1e-12)
    assert ModelPrice(1e-6, 2e-6, 0.0).cost(10, 0, 50) == 0.0  # never more cached than prompt


def test_cached_tokens_read_from_chat_and_responses_usage() -> None:
    assert cached_tokens(USAGE) == 600
    assert cached_tokens({"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}}) == 4
    assert cached_tokens({"prompt_tokens": 9}) == 0 and cached_tokens(None) == 0
    assert cached_tokens({"prompt_tokens_details": {"cached_tokens": "many"}}) == 0


def test_pricing_setting_adds_and_overrides_models() -> None:
    book = PriceBook(
        overrides={
            "my-llama": PriceSettings(input=0.5, output=1.5),
            "gpt-4o-mini": PriceSettings(input=0.1, output=0.4),  # negotiated; map's cached rate kept
            "gpt-4o": PriceSettings(input=2.0, output=8.0, cached_input=0.5),
        }
    )
    assert book.cost("my-llama", 1_000_000, 1_000_000) == pytest.approx(2.0, rel=1e-12)
    assert book.cost("openai/my-llama", 2000, 0) == pytest.approx(0.001, rel=1e-12)
    assert book.cost("gpt-4o-mini", 1000, 200, 600) == pytest.approx(
        400 * 0.1e-6 + 600 * 7.5e-08 + 200 * 0.4e-6, rel=1e-12
    )
    assert book.cost("gpt-4o", 1000, 0, 1000) == pytest.approx(1000 * 0.5e-6, rel=1e-12)


def test_pricing_loads_from_yaml_and_refuses_unknown_keys(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("pricing:\n  my-llama: {input: 0.5, output: 1.5, cached_input: 0.05}\n")
    settings = load_settings(config, environ={})
    assert settings.pricing["my-llama"] == PriceSettings(input=0.5, output=1.5, cached_input=0.05)
    config.write_text("pricing:\n  my-llama: {input: 0.5, output: 1.5, cache: 1}\n")
    with pytest.raises(ConfigError, match=r"pricing\.my-llama\.cache"):
        load_settings(config, environ={})


@pytest.fixture
async def cached_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible upstream whose answers report cached prompt tokens."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        answer: dict[str, Any] = {
            "id": "chatcmpl-cached",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": USAGE,
        }
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_a_live_gateway_prices_cached_tokens_and_configured_models(
    gateway_factory: Any, cached_upstream: str
) -> None:
    gateway = gateway_factory(
        upstream={"base_url": cached_upstream},
        routes=[{"name": "hosted", "match": ["my-llama"]}, {"name": "mini", "match": ["gpt-4o-mini"]}],
        pricing={"my-llama": {"input": 0.5, "output": 1.5, "cached_input": 0.05}},
    )
    async with aiohttp.ClientSession() as session:
        for model in ("my-llama", "gpt-4o-mini"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
    gateway.wait_for_records(2)
    samples, _, _ = await scrape(gateway.url)
    hosted = (400 * 0.5 + 600 * 0.05 + 200 * 1.5) / 1e6
    mini = 400 * 1.5e-07 + 600 * 7.5e-08 + 200 * 6e-07
    cost = "understudy_cost_usd_total"
    assert samples[(cost, labels(route="hosted", backend="cloud"))] == pytest.approx(hosted, rel=1e-12)
    assert samples[(cost, labels(route="mini", backend="cloud"))] == pytest.approx(mini, rel=1e-12)
