"""The bundled SmolLM2 learns a narrow task from ~40 examples: on held-out prompts the adapter
answers in the task's exact format far more often than the base model does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.samples import sentiment_chats, write_jsonl
from trainer.adapters import AdapterRegistry
from trainer.cli import main

MAX_NEW_TOKENS = 12


def answers(model: Any, tokenizer: Any, chats: list[dict[str, Any]]) -> list[str]:
    import torch

    out = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(
            chat["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        out.append(tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def parsed(answer: str) -> Any:
    try:
        return json.loads(answer)
    except json.JSONDecodeError:
        return None


def score(answers: list[str], expected: list[str]) -> tuple[float, float]:
    """(share in the task's format, share exactly right)."""
    values = [parsed(answer) for answer in answers]
    in_format = [isinstance(v, dict) and v.get("sentiment") in ("positive", "negative") for v in values]
    correct = [v == json.loads(e) for v, e in zip(values, expected, strict=True)]
    return sum(in_format) / len(values), sum(correct) / len(values)


@pytest.mark.slow
def test_adapter_learns_a_narrow_task_the_base_model_does_not_do(
    tmp_path: Path, data_dir: Path, model_cache_dir: Path
) -> None:
    from peft import PeftModel

    from local_backend.loading import load_model

    data = write_jsonl(tmp_path / "sentiment.jsonl", sentiment_chats())
    argv = ["--route", "sentiment", "--data", str(data), "--data-dir", str(data_dir)]
    assert main([*argv, "--model-cache", str(model_cache_dir), "--epochs", "2"]) == 0

    version = AdapterRegistry(data_dir).latest("sentiment")
    assert version is not None
    heldout = [json.loads(line) for line in version.heldout_path.read_text().splitlines()]
    assert len(heldout) >= 5 and version.meta["train_count"] >= 35
    expected = [chat["messages"][-1]["content"] for chat in heldout]

    model, tokenizer, _ = load_model("SmolLM2-135M-Instruct", model_cache_dir)
    base_format, base_correct = score(answers(model, tokenizer, heldout), expected)
    tuned = PeftModel.from_pretrained(model, str(version.path))
    tuned_format, tuned_correct = score(answers(tuned, tokenizer, heldout), expected)

    print(
        f"held-out {len(heldout)}: base format {base_format:.2f} correct {base_correct:.2f}; "
        f"adapter format {tuned_format:.2f} correct {tuned_correct:.2f}"
    )
    assert tuned_format >= 0.9, (tuned_format, base_format)
    assert tuned_correct >= 0.75, tuned_correct
    assert tuned_format - base_format >= 0.6 and tuned_correct - base_correct >= 0.6
