"""Rendering through the model's chat template and assistant-only label masking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.trainer.samples import word_chat
from trainer.chat_format import IGNORE_INDEX, TemplateMismatch, render, tokenize_sample

CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
NATIVE_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def labelled_text(tokenizer: Any, encoded: dict[str, list[int]]) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in encoded["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def test_only_the_answer_and_its_end_token_are_labelled(tiny_tokenizer: Any) -> None:
    sample = word_chat("apple")
    encoded = tokenize_sample(tiny_tokenizer, sample, max_length=512)
    assert encoded is not None
    assert tiny_tokenizer.decode(encoded["input_ids"]) == render(tiny_tokenizer, sample)
    assert labelled_text(tiny_tokenizer, encoded) == ["The word is apple.<|im_end|>"]
    labelled = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert labelled == encoded["input_ids"][-len(labelled) - 1 : -1]  # everything but the final newline


def test_history_turns_with_weight_zero_are_not_trained(tiny_tokenizer: Any) -> None:
    sample = {
        "messages": [
            {"role": "user", "content": "Say the word apple"},
            {"role": "assistant", "content": "The word is apple.", "weight": 0},
            {"role": "user", "content": "Say the word river"},
            {"role": "assistant", "content": "The word is river."},
        ]
    }
    encoded = tokenize_sample(tiny_tokenizer, sample, max_length=512)
    assert encoded is not None
    assert labelled_text(tiny_tokenizer, encoded) == ["The word is river.<|im_end|>"]
    del sample["messages"][1]["weight"]
    encoded = tokenize_sample(tiny_tokenizer, sample, max_length=512)
    assert encoded is not None
    assert labelled_text(tiny_tokenizer, encoded) == [
        "The word is apple.<|im_end|>",
        "The word is river.<|im_end|>",
    ]


def test_plain_template_gets_tools_and_calls_inline(tiny_tokenizer: Any) -> None:
    sample = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL], "weight": 0},
            {"role": "tool", "tool_call_id": "c1", "content": "4"},
            {"role": "assistant", "content": "4", "tool_calls": [CALL]},
        ],
        "tools": TOOLS,
    }
    text = render(tiny_tokenizer, sample)
    assert text.startswith("<|im_start|>system\nBe terse.\n\n# Tools")
    assert '\n{"name":"add","parameters":{"type":"object"}}\n' in text
    # A tool result is a user turn: a plain template may not know the `tool` role.
    assert "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>" in text
    encoded = tokenize_sample(tiny_tokenizer, sample, max_length=2048)
    assert encoded is not None
    call = '<tool_call>\n{"name":"add","arguments":{"a":2,"b":2}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text  # the untrained history call too
    assert labelled_text(tiny_tokenizer, encoded) == [f"4\n{call}<|im_end|>"]


def test_tools_system_prompt_added_when_there_is_none(tiny_tokenizer: Any) -> None:
    sample = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "tools": TOOLS,
    }
    assert render(tiny_tokenizer, sample).startswith("<|im_start|>system\n# Tools")
    encoded = tokenize_sample(tiny_tokenizer, sample, max_length=2048)
    assert encoded is not None and labelled_text(tiny_tokenizer, encoded) == ["4<|im_end|>"]


def test_tool_aware_template_gets_openai_messages_and_tools(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = NATIVE_TOOLS_TEMPLATE
    sample = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "tool_calls": [CALL]}],
        "tools": TOOLS,
    }
    text = render(tokenizer, sample)
    assert text.startswith("<|im_start|>system\nTOOLS [")
    encoded = tokenize_sample(tokenizer, sample, max_length=2048)
    assert encoded is not None
    # Arguments reach the template as an object, so its `tojson` does not double-encode them.
    assert labelled_text(tokenizer, encoded) == ['CALL add {"a": 2, "b": 2}<|im_end|>']


def test_cut_at_max_length_keeps_what_fits_or_drops_the_example(tiny_tokenizer: Any) -> None:
    sample = word_chat("apple")
    full = tokenize_sample(tiny_tokenizer, sample, max_length=512)
    assert full is not None
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    partial = tokenize_sample(tiny_tokenizer, sample, max_length=first_label + 2)
    assert partial is not None and len(partial["input_ids"]) == first_label + 2
    assert sum(label != IGNORE_INDEX for label in partial["labels"]) == 2
    assert tokenize_sample(tiny_tokenizer, sample, max_length=first_label) is None


def test_template_that_renders_prefixes_differently_is_refused(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
    )
    with pytest.raises(TemplateMismatch):
        tokenize_sample(tokenizer, word_chat("apple"), max_length=512)
