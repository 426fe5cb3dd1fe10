"""How many tokens a shadow/held-out local answer may use."""

from __future__ import annotations

from gateway.adaptive.controller import eval_max_tokens


def _cloud(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def test_request_budget_wins_but_is_capped() -> None:
    assert eval_max_tokens({"max_tokens": 40}, _cloud("x" * 1000)) == 40
    assert eval_max_tokens({"max_completion_tokens": 9000}, _cloud("x")) == 512


def test_heldout_samples_get_room_for_an_answer_like_the_clouds() -> None:
    assert eval_max_tokens({}, _cloud("short")) == 32
    assert eval_max_tokens({}, _cloud("y" * 300)) == 150
    assert eval_max_tokens({}, _cloud("z" * 5000)) == 512
