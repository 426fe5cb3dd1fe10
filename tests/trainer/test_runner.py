"""One training job run in this process: what it publishes next to the adapter."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.trainer.samples import word_chat, write_jsonl
from trainer.adapters import AdapterRegistry
from trainer.runner import JobContext, run_job
from trainer.spec import TrainSpec

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
JSON_MODE = {"type": "json_object"}


def tool_chat(word: str) -> dict[str, Any]:
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "lookup", "arguments": json.dumps({"w": word})},
    }
    return {
        "messages": [
            {"role": "user", "content": f"Look up {word}"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
        "tools": TOOLS,
        "tool_choice": "auto",
        "response_format": JSON_MODE,
    }


def test_heldout_lines_replay_the_request_and_meta_says_tools_were_trained(
    tmp_path: Path, data_dir: Path, tiny_spec: Callable[..., TrainSpec]
) -> None:
    chats = [tool_chat(f"w{i}") for i in range(8)] + [word_chat("apple")]
    spec = tiny_spec(data=write_jsonl(tmp_path / "tools.jsonl", chats), max_steps=1, epochs=1)
    ctx = JobContext("tools", data_dir, "ftjob-test", data_dir / "status.json")
    run_job(ctx, spec)

    version = AdapterRegistry(data_dir).latest("tools")
    assert version is not None and version.meta["trained_with_tools"] is True
    lines = [json.loads(line) for line in version.heldout_path.read_text().splitlines()]
    assert lines
    for line in lines:
        if "tools" in line:
            assert line["tools"] == TOOLS and line["tool_choice"] == "auto"
            assert line["response_format"] == JSON_MODE
        else:
            assert set(line) == {"messages"}


def test_meta_says_no_tools_when_no_sample_offered_any(
    tmp_path: Path, data_dir: Path, tiny_spec: Callable[..., TrainSpec]
) -> None:
    ctx = JobContext("words", data_dir, "ftjob-test", data_dir / "status.json")
    run_job(ctx, tiny_spec(max_steps=1, epochs=1))
    version = AdapterRegistry(data_dir).latest("words")
    assert version is not None and version.meta["trained_with_tools"] is False
