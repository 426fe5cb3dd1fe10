"""How many tokens a shadow/held-out local answer may use: counted in tokens, never characters."""

from __future__ import annotations

from typing import Any

from gateway.adaptive.evaluation import eval_max_tokens


def _cloud(text: str | None, completion_tokens: int | None = None, **message: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, **message}}]
    }
    if completion_tokens is not None:
        answer["usage"] = {"completion_tokens": completion_tokens}
    return answer


def test_request_budget_wins_but_is_capped() -> None:
    assert eval_max_tokens({"max_tokens": 40}, _cloud("x" * 1000)) == 40
    assert eval_max_tokens({"max_completion_tokens": 9000}, _cloud("x")) == 1024


def test_budget_comes_from_the_clouds_token_count_with_headroom() -> None:
    # 40 tokens of dense JSON in 60 characters: the old chars/2 rule gave 32 and cut it off.
    dense = '{"name":"Ada Lovelace","age":36,"city":"London","ok":true}'
    assert eval_max_tokens({}, _cloud(dense, completion_tokens=40)) == 76
    assert eval_max_tokens({}, _cloud("short", completion_tokens=2)) == 32
    assert eval_max_tokens({}, _cloud("z" * 5000, completion_tokens=1500)) == 1024


def test_without_usage_the_text_is_estimated_generously() -> None:
    assert eval_max_tokens({}, _cloud("y" * 300)) == 241
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x" }'}}
    assert eval_max_tokens({}, _cloud(None, tool_calls=[call])) >= 32
