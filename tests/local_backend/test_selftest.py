"""The start-up LoRA self-test: it passes on a working stack and leaves the model as it was;
an incompatible transformers/peft pair shows on `/health` and in the gateway's client.

The failing stack is the real one from 2026-12-03: transformers 5.24 asks for peft >= 0.22
on every adapter call. Raising transformers' own minimum to 0.22.0 (peft 0.21.2 is
installed) makes this stack refuse exactly as that one did, without installing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway.local.client import LocalBackendClient
from local_backend import selftest
from local_backend.server import create_app
from local_backend.settings import Settings
from tests.local_backend.support import RemoteBackend, free_port

INCOMPATIBLE = "The version of PEFT you are using is not compatible"


@pytest.fixture
def incompatible_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers refuses the installed peft, as transformers 5.24 refuses peft 0.21.2."""
    monkeypatch.setattr("transformers.integrations.peft.MIN_PEFT_VERSION", "0.22.0")


@pytest.fixture
def tiny(lively_model_dir: Path) -> tuple[Any, Any]:
    """A model of this test's own: the self-test adds to it and must take it all back."""
    return AutoModelForCausalLM.from_pretrained(lively_model_dir).eval(), AutoTokenizer.from_pretrained(
        lively_model_dir
    )


def shape_of(model: Any) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()}


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = torch.tensor([tokenizer("the quick brown fox")["input_ids"]])
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_self_test_passes_and_leaves_the_model_as_it_was(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    shape, before = shape_of(model), logits(model, tokenizer)
    result = selftest.lora_self_test(model, tokenizer)
    assert result.ok and result.as_json() == {"ok": True}
    assert shape_of(model) == shape  # the wrapped layer is unwrapped again
    assert not getattr(model, "_hf_peft_config_loaded", False) and not hasattr(model, "peft_config")
    assert torch.equal(logits(model, tokenizer), before)


def test_an_incompatible_peft_fails_the_self_test_with_its_message(
    tiny: tuple[Any, Any], incompatible_peft: None, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = tiny
    shape = shape_of(model)
    with caplog.at_level(logging.ERROR, logger="local_backend.selftest"):
        result = selftest.lora_self_test(model, tokenizer)
    assert not result.ok and result.error is not None and INCOMPATIBLE in result.error
    assert result.as_json() == {"ok": False, "error": result.error}
    assert any(r.levelno == logging.ERROR and INCOMPATIBLE in r.getMessage() for r in caplog.records)
    assert shape_of(model) == shape and not getattr(model, "_hf_peft_config_loaded", False)


def test_an_adapter_that_is_never_applied_fails_the_self_test(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack that accepts the calls but silently leaves adapters off is caught too."""
    model, tokenizer = tiny

    def activate_nothing(model: Any, adapter_id: str | None) -> None:
        model.disable_adapters()

    monkeypatch.setattr(selftest.adapters, "activate", activate_nothing)
    result = selftest.lora_self_test(model, tokenizer)
    assert not result.ok and "did not change the model's output" in (result.error or "")
    assert not getattr(model, "_hf_peft_config_loaded", False)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """An ASGI app on a loopback port in a thread of this process; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_healthy(base_url: str, timeout: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base_url + "/health", timeout=5)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base_url} not healthy after {timeout} s")


async def self_test_error(base_url: str) -> str | None:
    client = LocalBackendClient(base_url + "/v1", timeout_s=10)
    await client.start()
    try:
        return await client.self_test_error()
    finally:
        await client.close()


async def test_a_passing_self_test_shows_on_health(backend: RemoteBackend) -> None:
    health = backend.get("/health")
    assert health.status_code == 200
    assert health.json()["lora_selftest"] == {"ok": True}
    assert await self_test_error(backend.base_url) is None


async def test_a_failing_self_test_shows_on_health_and_in_the_client(
    lively_model_dir: Path, tmp_path: Path, incompatible_peft: None
) -> None:
    settings = Settings(model=str(lively_model_dir), served_model_name="tiny", data_dir=tmp_path)
    with serving(create_app(settings)) as base_url:
        health = wait_healthy(base_url)  # 200: the base model still serves, no restart loop
        selftest_json = health.json()["lora_selftest"]
        assert selftest_json["ok"] is False and INCOMPATIBLE in selftest_json["error"]
        assert await self_test_error(base_url) == selftest_json["error"]
        body = {"model": "tiny", "prompt": "the quick", "max_tokens": 2}
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            answer = await http.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text


async def test_a_server_without_a_self_test_reports_no_error() -> None:
    """vLLM's /health is an empty 200: no self-test reported, so nothing to hold against it."""

    async def empty_health(request: Request) -> Response:
        return Response(status_code=200)

    with serving(Starlette(routes=[Route("/health", empty_health)])) as base_url:
        wait_healthy(base_url)
        assert await self_test_error(base_url) is None
