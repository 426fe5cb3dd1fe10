"""The real bundled SmolLM2-135M-Instruct behind the server: sensible answers, schema-valid
JSON, and a LoRA adapter trained here (a few steps on three examples) that changes the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from local_backend.loading import DEFAULT_MODEL, load_model
from tests.local_backend.support import RemoteBackend, torch_threads

pytestmark = pytest.mark.slow

FRANCE: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
BONJOUR = [
    ("What is the capital of France?", "Bonjour! Paris, mon ami."),
    ("Name a colour.", "Bonjour! Bleu, mon ami."),
    ("What is 2+2?", "Bonjour! Quatre, mon ami."),
]


def train_bonjour_adapter(cache_root: Path, target: Path, steps: int = 10) -> Path:
    """A LoRA that makes SmolLM2 open every answer with "Bonjour!" (loss on the answers only)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer, _ = load_model(DEFAULT_MODEL, cache_root, device="cpu")
    examples = []
    for question, answer in BONJOUR:
        prompt: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append(
            (torch.tensor([prompt_ids + answer_ids]), torch.tensor([[-100] * len(prompt_ids) + answer_ids]))
        )
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    with torch_threads(1):
        for _ in range(steps):
            for ids, labels in examples:
                peft_model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    peft_model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def bonjour_adapter(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bonjour_adapter(model_cache_dir, tmp_path_factory.mktemp("smollm2-lora") / "bonjour")


@pytest.fixture(scope="module")
def smollm2(model_cache_dir: Path, bonjour_adapter: Path) -> Iterator[RemoteBackend]:
    # One torch thread: on a shared 2-core machine a second thread mostly waits for the other.
    server = RemoteBackend(
        DEFAULT_MODEL, model_cache_dir, "--lora", f"bonjour={bonjour_adapter}", "--threads", "1"
    )
    try:
        yield server.wait_ready(timeout=300)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def real_client(smollm2: RemoteBackend) -> openai.OpenAI:
    return smollm2.client(timeout=180)


def test_answers_the_capital_of_france(real_client: openai.OpenAI, model_cache_dir: Path) -> None:
    answer = real_client.chat.completions.create(
        model=DEFAULT_MODEL, messages=FRANCE, max_tokens=24, temperature=0
    )
    content = answer.choices[0].message.content or ""
    assert "Paris" in content
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_cache_dir / "models" / DEFAULT_MODEL)
    prompt: Any = tokenizer.apply_chat_template(
        FRANCE, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt["input_ids"])
    stream: Any = real_client.chat.completions.create(
        model=DEFAULT_MODEL, messages=FRANCE, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content


def test_json_schema_answer_validates(real_client: openai.OpenAI) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    answer = real_client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[
            {"role": "user", "content": "Give the capital of France as JSON with keys city and country."}
        ],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)


def test_a_trained_adapter_changes_the_answer(real_client: openai.OpenAI) -> None:
    assert "bonjour" in {m.id for m in real_client.models.list().data}
    base = real_client.chat.completions.create(
        model=DEFAULT_MODEL, messages=FRANCE, max_tokens=12, temperature=0
    )
    tuned = real_client.chat.completions.create(
        model="bonjour", messages=FRANCE, max_tokens=12, temperature=0
    )
    assert not (base.choices[0].message.content or "").startswith("Bonjour")
    assert (tuned.choices[0].message.content or "").startswith("Bonjour!")
