"""The admin API against its own OpenAPI document, with schemathesis: every phase (coverage,
fuzzing, stateful), every check (no 5xx, statuses/content types/bodies as documented, auth
enforced, invalid data rejected), on a real gateway with an adaptive route."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.demo.fakecloud import FakeCloudServer
from gateway.web.admin import endpoints
from tests.gateway.web.admin_fixtures import ADMIN_KEY, AdaptiveGateway, running_adaptive_gateway

# DELETE /admin/logs refuses to run without a filter (it would empty the log), a rule an
# OpenAPI document cannot state about two optional parameters: accept its 400 as valid.
# A dataset upload is JSONL whose every line must be a trainable chat: a schema can say
# "a string", not that; its 422 names the bad lines.
CONFIG = """
[[operations]]
include-operation-id = "delete_logs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403"]

[[operations]]
include-operation-id = "import_dataset"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


def test_admin_api_conforms_to_its_openapi_document(
    adaptive_gateway: AdaptiveGateway, tmp_path: Path
) -> None:
    # Records of every kind of answer, so the log endpoints return real rows to validate.
    assert adaptive_gateway.chat("served locally")[0] == "local"
    adaptive_gateway.chat("to the cloud", model="gpt-4o-mini")
    adaptive_gateway.chat("streamed", model="gpt-4o-mini", stream=False, max_tokens=5)
    with pytest.raises(openai.APIStatusError):
        adaptive_gateway.chat("fails", model="error-400")
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        adaptive_gateway.url + "/admin/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--checks",
        "all",
        "--max-examples",
        "100",
        "--seed",
        "7",
        "--workers",
        "1",
        "--request-timeout",
        "20",
    ]
    # run from tmp_path: schemathesis keeps a cache folder in its working directory
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    tested = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", result.stdout)
    assert tested and tested.group(1) == tested.group(2) == tested.group(3), result.stdout


async def test_every_admin_route_is_documented(adaptive_gateway: AdaptiveGateway) -> None:
    async with (
        aiohttp.ClientSession(headers={"authorization": f"Bearer {ADMIN_KEY}"}) as session,
        session.get(adaptive_gateway.url + "/admin/openapi.json") as response,
    ):
        document: dict[str, Any] = await response.json()
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert documented == {(e.method, e.path) for e in endpoints}
    assert document["openapi"].startswith("3.1")
    mode = document["paths"]["/admin/routes/{name}/mode"]["post"]
    assert set(mode["responses"]) >= {"200", "400", "401", "403", "404", "409", "422"}
    schema = document["components"]["schemas"]
    assert set(schema["ModeRequest"]["properties"]["mode"]["enum"]) == {"cloud", "local", "auto"}
