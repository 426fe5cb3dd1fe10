"""/metrics after known traffic, parsed with prometheus_client's parser: every DESIGN metric,
bounded labels, latency buckets, time to first token, cost and cost saved; the price map read
without importing litellm; several worker processes aggregated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo.fakecloud import FakeCloudServer
from gateway.pricing import PriceBook, bundled_price_map
from gateway.web.timeline import Snapshot, _delta_point, quantile
from tests.gateway.web.admin_fixtures import ROUTE, AdaptiveGateway, running_adaptive_gateway

DESIGN_METRICS = {
    "understudy_requests": "counter",
    "understudy_request_duration_seconds": "histogram",
    "understudy_time_to_first_token_seconds": "histogram",
    "understudy_tokens": "counter",
    "understudy_rate_limited": "counter",
    "understudy_inflight_requests": "gauge",
    "understudy_route_mode": "gauge",
    "understudy_eval_score": "gauge",
    "understudy_evals": "counter",
    "understudy_training_jobs": "counter",
    "understudy_upstream_retries": "counter",
    "understudy_log_records": "counter",
    "understudy_log_write_errors": "counter",
    "understudy_log_queue_depth": "gauge",
    "understudy_cost_usd": "counter",
    "understudy_cost_saved_usd": "counter",
}
GPT_4O_MINI = PriceBook().price("gpt-4o-mini")


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> tuple[Samples, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = await response.text()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return samples, {f.name: f.type for f in families}, text


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


def _usage_of(client: openai.OpenAI, model: str, text: str) -> tuple[int, int]:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    assert answer.usage is not None
    return answer.usage.prompt_tokens, answer.usage.completion_tokens


async def test_metrics_after_known_traffic(gateway_factory: Any) -> None:
    gateway = gateway_factory(routes=[{"name": "mini", "match": ["gpt-4o-mini"]}])
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0)
    tokens = [_usage_of(client, "gpt-4o-mini", f"what is {i} + {i}?") for i in range(3)]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream a few words please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = next(chunk.usage for chunk in stream if chunk.usage)
    tokens.append((usage.prompt_tokens, usage.completion_tokens))
    _usage_of(client, "random-client-model-7f3a", "unknown model, unknown price")
    with pytest.raises(openai.InternalServerError):
        _usage_of(client, "error-503", "fail")
    gateway.wait_for_records(6)

    samples, types, text = await scrape(gateway.url)
    for name, kind in DESIGN_METRICS.items():
        assert types.get(name) == kind, name
    mini = labels(route="mini", backend="cloud")
    assert samples[("understudy_requests_total", labels(route="mini", backend="cloud", code="200"))] == 4
    assert samples[("understudy_requests_total", labels(route="default", backend="cloud", code="200"))] == 1
    assert samples[("understudy_requests_total", labels(route="default", backend="cloud", code="503"))] == 1
    prompt, completion = sum(t[0] for t in tokens), sum(t[1] for t in tokens)
    assert (
        samples[("understudy_tokens_total", labels(route="mini", backend="cloud", kind="prompt"))] == prompt
    )
    assert (
        samples[("understudy_tokens_total", labels(route="mini", backend="cloud", kind="completion"))]
        == completion
    )
    assert GPT_4O_MINI is not None
    expected = prompt * GPT_4O_MINI.input_per_token + completion * GPT_4O_MINI.output_per_token
    assert samples[("understudy_cost_usd_total", mini)] == pytest.approx(expected, rel=1e-9)
    assert samples[("understudy_cost_usd_total", labels(route="default", backend="cloud"))] == 0
    # only the stream has a first token to time
    assert samples[("understudy_time_to_first_token_seconds_count", mini)] == 1
    assert samples[("understudy_request_duration_seconds_count", mini)] == 4
    buckets = {
        dict(key[1])["le"] for key in samples if key[0] == "understudy_request_duration_seconds_bucket"
    }
    assert {"0.005", "0.1", "1.0", "10.0", "120.0", "+Inf"} <= buckets
    assert samples[("understudy_route_mode", labels(route="mini", mode="cloud"))] == 1
    assert samples[("understudy_inflight_requests", labels(backend="cloud"))] == 0
    assert samples[("understudy_log_records_total", ())] >= 6
    assert samples[("understudy_log_queue_depth", ())] == 0
    # label values come from the config and fixed sets, never from the client's model string
    assert "random-client-model" not in text and "error-503" not in text
    routes = {dict(key[1]).get("route") for key in samples} - {None}
    assert routes <= {"mini", "default"}


async def test_local_answers_cost_nothing_and_count_as_saved(adaptive_gateway: AdaptiveGateway) -> None:
    client = openai.OpenAI(base_url=adaptive_gateway.url + "/v1", api_key="sk-x", max_retries=0)
    tokens = [_usage_of(client, "task-1", f"local question {i}") for i in range(2)]
    adaptive_gateway.gateway.wait_for_records(2)
    samples, _, _ = await scrape(adaptive_gateway.url)
    assert samples[("understudy_requests_total", labels(route=ROUTE, backend="local", code="200"))] == 2
    assert samples[("understudy_cost_usd_total", labels(route=ROUTE, backend="local"))] == 0
    assert GPT_4O_MINI is not None
    prompt, completion = sum(t[0] for t in tokens), sum(t[1] for t in tokens)
    # priced as the route's upstream model (gpt-4o-mini), not the client's "task-1"
    saved = prompt * GPT_4O_MINI.input_per_token + completion * GPT_4O_MINI.output_per_token
    assert samples[("understudy_cost_saved_usd_total", labels(route=ROUTE))] == pytest.approx(saved, rel=1e-9)
    assert samples[("understudy_route_mode", labels(route=ROUTE, mode="local"))] == 1
    assert samples[("understudy_route_mode", labels(route=ROUTE, mode="cloud"))] == 0


def test_price_book_reads_the_bundled_map() -> None:
    assert bundled_price_map() is not None
    prices = PriceBook()
    assert prices.price("gpt-4o-mini") == GPT_4O_MINI
    assert prices.price("openai/gpt-4o-mini") == GPT_4O_MINI  # a provider prefix is dropped
    assert prices.price("GPT-4o-mini") == GPT_4O_MINI
    assert prices.price("no-such-model-anywhere") is None
    assert prices.cost("no-such-model-anywhere", 1000, 1000) == 0.0
    assert prices.cost(None, 10, 10) == 0.0


def test_price_book_survives_a_missing_or_broken_map(tmp_path: Path) -> None:
    broken = tmp_path / "prices.json"
    broken.write_text("{not json")
    assert PriceBook(broken).cost("gpt-4o-mini", 10, 10) == 0.0
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({"my-model": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}))
    assert PriceBook(custom).cost("my-model", 100, 10) == pytest.approx(1.2e-4)


def test_pricing_never_imports_litellm() -> None:
    script = textwrap.dedent(
        """
        import sys
        from gateway.app import create_app
        from gateway.pricing import PriceBook
        assert PriceBook().cost("gpt-4o-mini", 10, 10) > 0
        print("litellm" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_metrics_aggregate_across_worker_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, each worker writes its own values and a scrape in
    any worker sees them all."""
    worker = textwrap.dedent(
        """
        import sys
        from gateway.metrics import Metrics
        m = Metrics()
        m.requests.labels("default", "cloud", "200").inc(int(sys.argv[1]))
        m.cost.labels("default", "cloud").inc(0.5)
        m.route_mode.labels("default", "cloud").set(1)
        m.track(m.log_queue_depth, lambda: 3)
        if len(sys.argv) > 2:
            print(m.render()[0].decode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in ("2", "5"):
        subprocess.run([sys.executable, "-c", worker, count], env=env, check=True)
    result = subprocess.run(
        [sys.executable, "-c", worker, "1", "render"], env=env, check=True, capture_output=True, text=True
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(result.stdout)
        for s in family.samples
    }
    assert samples[("understudy_requests_total", labels(route="default", backend="cloud", code="200"))] == 8
    assert samples[("understudy_cost_usd_total", labels(route="default", backend="cloud"))] == 1.5
    assert samples[("understudy_log_queue_depth", ())] == 3  # read at the scrape, this worker alive


def test_latency_quantiles_from_histogram_buckets() -> None:
    cumulative = [(0.1, 10.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, cumulative) == pytest.approx(0.1 + 0.4 * 40 / 80)
    assert quantile(0.95, cumulative) == pytest.approx(0.5 + 0.5 * 5 / 10)
    assert quantile(0.5, []) is None
    assert quantile(0.99, [(0.1, 1.0), (float("inf"), 2.0)]) == 0.1
    before, after = Snapshot(), Snapshot()
    after.requests[("r", "local")] = 4
    after.requests[("r", "cloud")] = 1
    after.errors["r"] = 1
    after.buckets["r"].update({0.1: 5.0, float("inf"): 5.0})
    point = _delta_point(10.0, "r", before, after)
    assert (point.cloud, point.local, point.failover, point.errors) == (1, 4, 0, 1)
    assert point.p50_ms == pytest.approx(50.0)
