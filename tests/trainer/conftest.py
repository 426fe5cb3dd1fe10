"""Fixtures for the trainer tests: synthetic chats and log records, the tiny model's tokenizer,
and a spec that trains the tiny random Llama fast and visibly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.samples import WORDS, word_chat, write_jsonl
from trainer.spec import TrainSpec


@pytest.fixture
def word_chats() -> list[dict[str, Any]]:
    return [word_chat(word) for word in WORDS]


@pytest.fixture
def chats_file(tmp_path: Path, word_chats: list[dict[str, Any]]) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", word_chats)


@pytest.fixture
def make_record() -> Callable[..., dict[str, Any]]:
    """A gateway log record of a successful cloud chat answer; keyword arguments override."""

    def make(prompt: str = "What is 2+2?", answer: str | None = "4", **overrides: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer, "refusal": None}
        record = {
            "id": 1,
            "ts": "2026-01-01T00:00:00Z",
            "route": "r",
            "backend": "cloud",
            "model": "gpt-4o-mini",
            "endpoint": "/v1/chat/completions",
            "status": 200,
            "outcome": "ok",
            "request": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": prompt}],
            },
            "response": {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            },
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
        }
        record.update(overrides)
        return record

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_spec(tiny_model_dir: Path, chats_file: Path) -> Callable[..., TrainSpec]:
    """A spec for the tiny model; a high learning rate so the loss visibly falls in a few steps."""

    def make(**overrides: Any) -> TrainSpec:
        fields: dict[str, Any] = {
            "data": chats_file,
            "base_model": str(tiny_model_dir),
            "learning_rate": 1e-2,
            "epochs": 4,
            **overrides,
        }
        return TrainSpec(**fields)

    return make
