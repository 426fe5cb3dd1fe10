"""The database down under the admin API: a 503 in OpenAI's shape (Retry-After, the code
`store_unavailable`), never a bare 500, while /v1 keeps answering; back once it returns. A
real PostgreSQL server, stopped with pg_ctl."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai

from tests.conftest import GatewayFactory, PostgresCluster


def _get(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_admin_calls_answer_503_while_the_database_is_down(
    gateway_factory: GatewayFactory, postgres_cluster: PostgresCluster, postgres_url: str
) -> None:
    gateway = gateway_factory(database_url=postgres_url)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "before"}])
    assert _get(gateway.url + "/admin/logs?limit=5")[0] == 200

    postgres_cluster.stop()
    try:
        status, body, headers = _get(gateway.url + "/admin/logs?limit=5")
        assert status == 503, body
        assert body["error"]["code"] == "store_unavailable" and "retry-after" in {k.lower() for k in headers}
        assert postgres_url.rsplit("@", 1)[-1].split("/")[0] not in json.dumps(body)  # no host:port
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "while down"}]
        )
        assert answer.choices[0].message.content  # proxying goes on
    finally:
        postgres_cluster.start()
    deadline = time.monotonic() + 30
    while (result := _get(gateway.url + "/admin/logs?limit=5"))[0] != 200:
        assert time.monotonic() < deadline, result
        time.sleep(0.5)
