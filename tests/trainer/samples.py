"""Synthetic training data for the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "ocean", "maple", "comet",
    "sugar", "violet", "ember", "falcon", "glacier", "harbor", "island", "jasper", "kettle", "lantern",
]  # fmt: skip


def word_chat(word: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Say the word {word}"},
            {"role": "assistant", "content": f"The word is {word}."},
        ]
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


THINGS = ["movie", "meal", "hotel", "concert", "book", "service", "game", "trip", "class", "show"]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "lovely"]
NEGATIVE = ["terrible", "awful", "boring", "disappointing", "horrible"]


def sentiment_chats() -> list[dict[str, Any]]:
    """A narrow task the base model does not do unprompted: answer a review with exactly
    `{"sentiment": "positive"|"negative"}`. 50 chats, balanced."""
    chats = []
    for i, thing in enumerate(THINGS):
        for j in range(5):
            positive = (i + j) % 2 == 0
            adjective = (POSITIVE if positive else NEGATIVE)[(i + 2 * j) % 5]
            label = "positive" if positive else "negative"
            chats.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Review: The {thing} was {adjective}."},
                        {"role": "assistant", "content": json.dumps({"sentiment": label})},
                    ]
                }
            )
    return chats
