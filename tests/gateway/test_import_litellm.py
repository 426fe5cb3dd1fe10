"""`understudy import-litellm` on real-world-shaped LiteLLM proxy configs: the written
gateway.yaml loads with the real settings loader, its routes answer through fake clouds (the
OpenAI, Azure and Anthropic wire formats) via the openai SDK, and what did not carry over is
reported by path, never by value."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from gateway.cli import main
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.litellm_import import env_refs
from gateway.settings import load_settings
from tests.conftest import RunningGateway, start_gateway
from tests.gateway.upstream.test_litellm_provider import FakeAnthropic

OPENAI_CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/OPENAI_API_KEY
      api_base: os.environ/OPENAI_API_BASE
      rpm: 600
      tpm: 100000
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini-2024-07-18
      api_key: os.environ/OPENAI_API_KEY
      api_base: os.environ/OPENAI_API_BASE
      rpm: 1
      temperature: 0.1
litellm_settings:
  num_retries: 2
  request_timeout: 30
  drop_params: true
  fallbacks: [{"gpt-4o": ["gpt-4o-mini"]}]
general_settings:
  master_key: sk-litellm-master-1234
"""

AZURE_CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o-prod
      api_base: os.environ/AZURE_API_BASE
      api_key: os.environ/AZURE_API_KEY
      api_version: "2024-10-21"
      rpm: 60
      tpm: 90000
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o-backup
      api_base: os.environ/AZURE_BACKUP_API_BASE
      api_key: os.environ/AZURE_BACKUP_API_KEY
      api_version: "2024-10-21"
router_settings:
  routing_strategy: simple-shuffle
  model_group_alias: {"gpt-4": "gpt-4o"}
  num_retries: 3
  timeout: 30
  allowed_fails: 2
  cooldown_time: 60
  redis_host: os.environ/REDIS_HOST
  redis_port: os.environ/REDIS_PORT
  redis_password: os.environ/REDIS_PASSWORD
"""

ANTHROPIC_CONFIG = """
model_list:
  - model_name: claude-sonnet
    litellm_params:
      model: anthropic/claude-sonnet-4-5-20250929
      api_key: os.environ/ANTHROPIC_API_KEY
      api_base: os.environ/ANTHROPIC_API_BASE
      rpm: 50
      tpm: 40000
      max_tokens: 1024
    model_info:
      input_cost_per_token: 0.000003
      output_cost_per_token: 0.000015
  - model_name: claude-haiku
    litellm_params:
      model: claude-haiku-4-5-20251001
      api_key: os.environ/ANTHROPIC_API_KEY
      api_base: os.environ/ANTHROPIC_API_BASE
litellm_settings:
  fallbacks: [{"claude-sonnet": ["claude-haiku"]}]
  context_window_fallbacks: [{"claude-haiku": ["claude-sonnet"]}]
  success_callback: ["langfuse"]
  cache: true
environment_variables:
  LANGFUSE_PUBLIC_KEY: pk-lf-planted-secret
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  database_url: os.environ/DATABASE_URL
"""


class FakeAzure(FakeCloud):
    """Azure OpenAI's wire format: the deployment in the path, api-version and api-key required."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure_chat)
        return app

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if not request.headers.get("api-key"):
            return web.json_response({"error": {"code": "401", "message": "Access denied"}}, status=401)
        return await self.chat(request)


@pytest.fixture
def azure() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeAzure()).start()
    yield server
    server.stop()


@pytest.fixture
def anthropic() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeAnthropic()).start()
    yield server
    server.stop()


@pytest.fixture
def gateways() -> Iterator[list[RunningGateway]]:
    running: list[RunningGateway] = []
    yield running
    for gateway in running:
        gateway.stop()


def convert(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    source, output = tmp_path / "litellm_config.yaml", tmp_path / "gateway.yaml"
    source.write_text(text)
    assert main(["import-litellm", str(source), "-o", str(output)]) == 0
    return output, capsys.readouterr().err


def serve(path: Path, environ: dict[str, str], tmp_path: Path, running: list[RunningGateway]) -> Any:
    settings = load_settings(path, environ=environ, data_dir=tmp_path / "data", local={"enabled": False})
    gateway = start_gateway(settings)
    running.append(gateway)
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0)


def ask(client: Any, model: str, text: str = "hi") -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return str(answer.choices[0].message.content)


def test_openai_config(
    tmp_path: Path, fake_cloud: FakeCloudServer, gateways: list[RunningGateway], capsys: Any
) -> None:
    path, report = convert(tmp_path, OPENAI_CONFIG, capsys)
    environ = {"OPENAI_API_KEY": "sk-openai-from-env", "OPENAI_API_BASE": fake_cloud.base_url}
    client = serve(path, environ, tmp_path, gateways)
    assert ask(client, "gpt-4o") == "echo: hi"
    seen = fake_cloud.cloud.requests[-1]
    assert seen.headers["Authorization"] == "Bearer sk-openai-from-env"
    assert ask(client, "gpt-4o-mini", "again") == "echo: again"
    assert orjson.loads(fake_cloud.cloud.requests[-1].body)["model"] == "gpt-4o-mini-2024-07-18"
    with pytest.raises(openai.RateLimitError):  # rpm: 1 carried to the route
        ask(client, "gpt-4o-mini")
    settings = load_settings(path, environ=environ)
    upstream = settings.upstreams[settings.routes[0].upstream]
    assert (upstream.retry.attempts, upstream.timeout_s) == (3, 30.0)
    limits = settings.routes[0].limits
    assert limits is not None and (limits.rpm, limits.tpm) == (600, 100000)
    for path_named in ("litellm_settings.fallbacks", "litellm_settings.drop_params"):
        assert f"not carried over: {path_named}: " in report
    assert "not carried over: model_list[1].litellm_params.temperature" in report
    assert "re-issue: general_settings.master_key" in report
    assert "sk-litellm-master-1234" not in report + path.read_text()


def test_azure_config(
    tmp_path: Path, azure: FakeCloudServer, redis_url: str, gateways: list[RunningGateway], capsys: Any
) -> None:
    path, report = convert(tmp_path, AZURE_CONFIG, capsys)
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    environ = {
        "AZURE_API_BASE": f"http://127.0.0.1:{azure.port}",
        "AZURE_API_KEY": "az-key-from-env",
        "REDIS_HOST": host,
        "REDIS_PORT": port,
    }
    client = serve(path, environ, tmp_path, gateways)
    assert ask(client, "gpt-4o") == "echo: hi"
    assert ask(client, "gpt-4", "alias") == "echo: alias"  # model_group_alias
    seen = azure.cloud.requests[-1]
    assert seen.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert seen.query == "api-version=2024-10-21"
    assert seen.headers["api-key"] == "az-key-from-env"
    settings = load_settings(path, environ=environ)
    assert settings.redis_url == f"redis://:@{host}:{port}/0"
    (upstream,) = settings.upstreams.values()
    assert (upstream.provider, upstream.model_prefix, upstream.api_version) == (
        "litellm",
        "azure/",
        "2024-10-21",
    )
    assert (upstream.retry.attempts, upstream.timeout_s) == (4, 30.0)
    assert (upstream.breaker.failure_threshold, upstream.breaker.cooldown_s) == (2, 60.0)
    assert "not carried over: router_settings.routing_strategy: " in report
    assert "not carried over: model_list[1] (another deployment of 'gpt-4o')" in report


def test_anthropic_config(
    tmp_path: Path, anthropic: FakeCloudServer, gateways: list[RunningGateway], capsys: Any
) -> None:
    path, report = convert(tmp_path, ANTHROPIC_CONFIG, capsys)
    environ = {
        "ANTHROPIC_API_KEY": "sk-ant-from-env",
        "ANTHROPIC_API_BASE": f"http://127.0.0.1:{anthropic.port}",
    }
    client = serve(path, environ, tmp_path, gateways)
    assert ask(client, "claude-sonnet") == "claude says: hi"
    seen = anthropic.cloud.requests[-1]
    assert orjson.loads(seen.body)["model"] == "claude-sonnet-4-5-20250929"
    assert seen.headers["x-api-key"] == "sk-ant-from-env"
    assert ask(client, "claude-haiku", "bare") == "claude says: bare"  # a bare name: anthropic
    assert orjson.loads(anthropic.cloud.requests[-1].body)["model"] == "claude-haiku-4-5-20251001"
    settings = load_settings(path, environ=environ)
    price = settings.pricing["claude-sonnet-4-5-20250929"]
    assert (price.input, price.output) == pytest.approx((3.0, 15.0))
    limits = settings.routes[0].limits
    assert limits is not None and (limits.rpm, limits.tpm) == (50, 40000)
    for path_named in (
        "litellm_settings.fallbacks",
        "litellm_settings.context_window_fallbacks",
        "litellm_settings.success_callback",
        "litellm_settings.cache",
        "environment_variables",
        "general_settings.database_url",
        "model_list[0].litellm_params.max_tokens",
    ):
        assert f"not carried over: {path_named}: " in report
    assert "pk-lf-planted-secret" not in report + path.read_text()


def test_env_references_become_interpolations() -> None:
    assert env_refs({"a": ["os.environ/KEY", "plain"], "b": 3}) == {"a": ["${KEY}", "plain"], "b": 3}


@pytest.mark.parametrize("text", [OPENAI_CONFIG, AZURE_CONFIG, ANTHROPIC_CONFIG])
def test_written_file_loads_with_no_variable_set(tmp_path: Path, capsys: Any, text: str) -> None:
    path, _ = convert(tmp_path, text, capsys)
    settings = load_settings(path, environ={})
    for upstream in settings.upstreams.values():
        assert upstream.api_key is None
        assert upstream.base_url == ("" if upstream.provider == "litellm" else "https://api.openai.com/v1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just a list\n", "the top level must be a mapping"),
        (
            "model_list: [{model_name: x, litellm_params: {}}]\n",
            "model_list[0].litellm_params.model: missing",
        ),
        ("model_list: [{model_name: x, litellm_params: {model: openai/x, rpm: lots}}]\n", "ValueError"),
        ("model_list: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, capsys: Any, text: str, message: str) -> None:
    source = tmp_path / "litellm_config.yaml"
    source.write_text(text)
    assert main(["import-litellm", str(source), "-o", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.yaml").exists()


def test_an_existing_output_is_kept(tmp_path: Path, capsys: Any) -> None:
    source, output = tmp_path / "litellm_config.yaml", tmp_path / "gateway.yaml"
    source.write_text(OPENAI_CONFIG)
    output.write_text("port: 9000\n")
    assert main(["import-litellm", str(source), "-o", str(output)]) == 2
    assert output.read_text() == "port: 9000\n"
    assert main(["import-litellm", str(source), "-o", str(output), "--force"]) == 0
    assert "routes:" in output.read_text()
