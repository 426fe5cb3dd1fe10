"""LoRA adapters: selected per request by name, loaded and unloaded at run time, and
swapped without disturbing requests in flight."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.local_backend.support import RemoteBackend

PROMPT: list[Any] = [{"role": "user", "content": "the quick brown fox"}]
LONG: dict[str, Any] = {"max_tokens": 300, "temperature": 0, "extra_body": {"ignore_eos": True}}


def greedy(client: openai.OpenAI, model: str, tokens: int = 16) -> str:
    answer = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return answer.choices[0].message.content or ""


def load(backend: RemoteBackend, name: str, path: Path, inplace: bool = False) -> Any:
    body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
    return backend.post("/v1/load_lora_adapter", json=body)


def unload(backend: RemoteBackend, name: str) -> Any:
    return backend.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_models_lists_the_base_and_its_adapters(client: openai.OpenAI, lora_dirs: dict[str, Path]) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny"].model_extra is not None and models["tiny"].model_extra["parent"] is None
    alpha = models["alpha"].model_extra
    assert alpha is not None and alpha["parent"] == "tiny" and alpha["root"] == str(lora_dirs["alpha"])


def test_an_adapter_changes_the_output_and_the_base_is_untouched(client: openai.OpenAI) -> None:
    base = greedy(client, "tiny")
    assert greedy(client, "alpha") != base
    assert greedy(client, "tiny") == base


def test_load_use_and_unload_at_run_time(
    backend: RemoteBackend, client: openai.OpenAI, lora_dirs: dict[str, Path]
) -> None:
    loaded = load(backend, "beta", lora_dirs["beta"])
    assert loaded.status_code == 200, loaded.text
    try:
        assert "beta" in {m.id for m in client.models.list().data}
        beta = greedy(client, "beta")
        assert beta not in (greedy(client, "tiny"), greedy(client, "alpha"))
        assert load(backend, "beta", lora_dirs["beta"]).status_code == 400  # already loaded
    finally:
        assert unload(backend, "beta").status_code == 200
    assert "beta" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "beta")
    assert unload(backend, "beta").status_code == 404


def test_load_inplace_replaces_an_adapter(
    backend: RemoteBackend, client: openai.OpenAI, lora_dirs: dict[str, Path]
) -> None:
    assert load(backend, "gamma", lora_dirs["gamma"]).status_code == 200
    assert load(backend, "route", lora_dirs["beta"]).status_code == 200
    try:
        before = greedy(client, "route")
        assert load(backend, "route", lora_dirs["gamma"], inplace=True).status_code == 200
        assert greedy(client, "route") == greedy(client, "gamma") != before
    finally:
        unload(backend, "route")
        unload(backend, "gamma")


def test_broken_adapters_are_refused_and_the_server_keeps_serving(
    backend: RemoteBackend, client: openai.OpenAI, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    get_peft_model(LlamaForCausalLM(other), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "x")
    )
    before = greedy(client, "tiny")
    for name, path in [
        ("wrong-shape", tmp_path / "x"),
        ("nowhere", tmp_path / "missing"),
        ("empty", tmp_path),
    ]:
        response = load(backend, name, path)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_adapter"
    assert load(backend, "tiny", tmp_path / "x").status_code == 400  # the base model's name
    assert greedy(client, "tiny") == before
    assert {m.id for m in client.models.list().data} == {"tiny", "alpha"}


async def test_adapter_swaps_do_not_disturb_requests_in_flight(
    backend: RemoteBackend, lora_dirs: dict[str, Path]
) -> None:
    client = backend.async_client()
    assert load(backend, "delta", lora_dirs["beta"]).status_code == 200
    expected = {}
    for model in ("alpha", "delta", "tiny"):
        answer = await client.chat.completions.create(model=model, messages=PROMPT, **LONG)
        expected[model] = answer.choices[0].message.content

    async def stream(model: str, started: asyncio.Event) -> tuple[str, float]:
        chunks = await client.chat.completions.create(model=model, messages=PROMPT, stream=True, **LONG)
        text = ""
        async for chunk in chunks:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            started.set()
        return text, time.monotonic()

    started = {m: asyncio.Event() for m in expected}
    streams = {m: asyncio.create_task(stream(m, started[m])) for m in expected}
    await asyncio.gather(*(e.wait() for e in started.values()))
    # While all three generate: load and unload other adapters, and unload the one in use.
    churn = await asyncio.to_thread(_churn, backend, lora_dirs)
    finished = {m: await task for m, task in streams.items()}
    for model, (text, _) in finished.items():
        assert text == expected[model], f"{model} was disturbed"
    assert min(done_at for _, done_at in finished.values()) > churn, "the swaps did not overlap the streams"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="delta", messages=PROMPT, max_tokens=2)


def _churn(backend: RemoteBackend, lora_dirs: dict[str, Path]) -> float:
    assert load(backend, "epsilon", lora_dirs["gamma"]).status_code == 200
    assert unload(backend, "delta").status_code == 200  # in use by a running stream
    assert unload(backend, "epsilon").status_code == 200
    return time.monotonic()
