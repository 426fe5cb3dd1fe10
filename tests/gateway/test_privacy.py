"""Privacy deletion reaches derived data: after `DELETE /admin/logs`, a planted marker is in no
file under the data dir (records, evals, adapters' splits, staging, job files), and what was
not deleted stays."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.demo.fakecloud import FakeCloudServer
from gateway.privacy import Forget
from gateway.store.base import EvalRecord, LogRecord
from tests.gateway.web.admin_fixtures import ROUTE, AdaptiveGateway, running_adaptive_gateway
from tests.gateway.web.test_admin_api import call


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        yield gateway


def _sample(text: str) -> str:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    return json.dumps({"messages": [*messages, {"role": "assistant", "content": "ok"}]}) + "\n"


def _plant_derived(data_dir: Path, secret: str, clean: str) -> None:
    adapters = data_dir / "adapters" / ROUTE
    for name in ("train.jsonl", "heldout.jsonl", "validation.jsonl"):
        (adapters / "v1" / name).write_text(_sample(secret) + _sample(clean))
    (adapters / "v2" / "train.jsonl").write_text(_sample(clean))
    staging = adapters / ".staging-ftjob-running"
    staging.mkdir()
    (staging / "train.jsonl").write_text(_sample(secret))
    jobs = data_dir / "jobs"
    jobs.mkdir(exist_ok=True)
    prompt = json.dumps([{"role": "user", "content": secret}])
    (jobs / "ftjob-old.failed.jsonl").write_text(json.dumps({"prompt": prompt, "cloud_answer": "x"}) + "\n")
    (jobs / "ftjob-old.log").write_text(f"step 1 loss 2.0\nbad sample: {json.dumps(secret)}\nstep 2\n")
    status = {"status": "error", "message": f"trainer exited: {secret}", "route": ROUTE}
    (jobs / "ftjob-old.json").write_text(json.dumps(status))


def _plant_store(gateway: AdaptiveGateway, secret: str, clean: str) -> None:
    store = gateway.gateway.app.services.store
    for text in (secret, clean):
        store.insert_eval(
            EvalRecord(
                ts=time.time(),
                route=ROUTE,
                adapter_version=1,
                phase="heldout",
                judge="exact",
                passed=True,
                score=100.0,
                scores=None,
                prompt=json.dumps([{"role": "user", "content": text}]),
                cloud_answer='"ok"',
                local_answer='"ok"',
            )
        )
    judge_prompt = f"Grade this.\nQuestion: {secret}\nReference: ok\nCandidate: ok"
    store.insert_records(
        [
            LogRecord(
                request_id="req_judge",
                ts=time.time() + 3600,  # newer than any `before`: found by its content
                route=ROUTE,
                backend="cloud",
                endpoint="/v1/chat/completions",
                method="POST",
                status=200,
                outcome="ok",
                kind="judge",
                request=json.dumps({"messages": [{"role": "user", "content": judge_prompt}]}),
            )
        ]
    )


def _files_holding(root: Path, needle: str) -> list[Path]:
    forms = {needle.encode(), json.dumps(needle).encode()}
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and any(form in path.read_bytes() for form in forms)
    ]


async def test_deletion_leaves_no_trace_of_the_prompt_under_the_data_dir(
    adaptive_gateway: AdaptiveGateway,
) -> None:
    data_dir = adaptive_gateway.gateway.settings.data_dir
    secret = f"my address is PLANTED-{secrets.token_hex(8)}"
    clean = "what is the capital of France?"
    adaptive_gateway.chat(secret)
    adaptive_gateway.chat(clean, model="other-model")  # the default route: not deleted
    adaptive_gateway.gateway.wait_for_records(2)
    _plant_derived(data_dir, secret, clean)
    _plant_store(adaptive_gateway, secret, clean)
    assert _files_holding(data_dir, secret)

    before = datetime.fromtimestamp(time.time() + 60, UTC).isoformat().replace("+00:00", "Z")
    query = f"route={ROUTE}&before={before}&retrain=true"
    status, body, _ = await call(adaptive_gateway.url, "DELETE", f"/admin/logs?{query}")

    assert status == 200, body
    assert body["deleted"] == 1
    derived = body["derived"]
    assert derived["own_calls"] == 1 and derived["evals"] == 1
    assert derived["adapter_lines"] == {"train.jsonl": 2, "heldout.jsonl": 1, "validation.jsonl": 1}
    assert derived["job_lines"] == 3  # the failed pair, the log line, the status message
    assert {"route": ROUTE, "version": "v1"} in derived["adapters_trained_on_deleted"]
    assert list(body["retrain_jobs"]) == [ROUTE]
    assert secret not in json.dumps(body)
    assert _files_holding(data_dir, secret) == []

    v1 = data_dir / "adapters" / ROUTE / "v1"
    assert (v1 / "train.jsonl").read_text() == _sample(clean)
    assert json.loads((v1 / "meta.json").read_text())["trained_on_deleted"] is True
    assert "trained_on_deleted" not in json.loads((v1.parent / "v2" / "meta.json").read_text())
    assert "step 1 loss 2.0" in (data_dir / "jobs" / "ftjob-old.log").read_text()
    status, adapters, _ = await call(adaptive_gateway.url, "GET", f"/admin/routes/{ROUTE}/adapters")
    marked = {a["version"]: a["meta"].get("trained_on_deleted", False) for a in adapters["data"]}
    assert marked[1] is True and marked[2] is False
    evals = adaptive_gateway.gateway.app.services.store.list_evals(ROUTE, 10)
    assert len(evals) == 1 and clean in json.dumps(evals[0]["prompt"])
    status, page, _ = await call(adaptive_gateway.url, "GET", "/admin/logs?route=default")
    assert len(page["data"]) == 1  # the other route's record stays


def test_matching_is_exact_in_json_and_by_substring_in_free_text() -> None:
    forget = Forget()
    forget.add_request(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "hi"}],
                }
            ]
        }
    )
    forget.add_request({"messages": [{"role": "system", "content": "shared system prompt"}]})
    assert forget.texts == {"part one", "hi", "part one\nhi"}  # never the system prompt
    assert forget.matches_json({"messages": [{"role": "user", "content": "hi"}]})
    assert not forget.matches_json({"messages": [{"role": "user", "content": "hi there"}]})
    assert forget.matches_json({"prompt": json.dumps([{"content": "part one\nhi"}])})  # nested JSON
    assert forget.matches_text('loss 1.0 sample "part one\\nhi"')
    assert not forget.matches_text("this line says hi")  # too short to search free text for
