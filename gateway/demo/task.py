"""A narrow, deterministic task a 135M model learns from a few dozen examples: pull a person's
name, age and city out of a sentence as compact JSON. The simulated cloud answers it exactly;
prompts are drawn so that evaluation prompts are never ones the model trained on."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import orjson

SYSTEM = "Extract the person's name, age and city from the sentence. Answer with JSON only."
NAMES = [
    "Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jonas",
    "Keiko", "Luca", "Maya", "Nikos", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara",
    "Umar", "Vera", "Wim", "Ximena", "Yusuf", "Zoe",
]  # fmt: skip
CITIES = [
    "Paris", "Lagos", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Dublin", "Hanoi", "Porto",
    "Tunis", "Zagreb", "Austin", "Perth", "Accra", "Bergen", "Cusco", "Delhi", "Essen", "Fez",
]  # fmt: skip
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, {age}, from {city}.",
    "{name} ({age}) has made a home in {city}.",
    "Living in {city}, {name} just turned {age}.",
]
_PATTERNS = [
    re.compile(
        re.escape(t)
        .replace(r"\{name\}", r"(?P<name>\w+)")
        .replace(r"\{age\}", r"(?P<age>\d+)")
        .replace(r"\{city\}", r"(?P<city>\w+)")
    )
    for t in TEMPLATES
]


@dataclass(frozen=True)
class Example:
    sentence: str
    answer: str  # the compact JSON the cloud gives

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.sentence}]


def make_example(rng: random.Random) -> Example:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    return Example(sentence, orjson.dumps({"name": name, "age": age, "city": city}).decode())


def examples(count: int, seed: int) -> list[Example]:
    """`count` distinct examples; different seeds give (almost surely) disjoint sentences."""
    rng = random.Random(seed)
    seen: dict[str, Example] = {}
    while len(seen) < count:
        example = make_example(rng)
        seen.setdefault(example.sentence, example)
    return list(seen.values())


# Asked to write new user messages like some examples (gateway.adaptive.synthetic's request),
# the simulated cloud writes sentences in the templates the examples it was shown use, with
# any name, age and city, as a capable model would. Seeded: a run is reproducible.
_ASKED_TO_WRITE = re.compile(r"Write (\d+) new messages")
_writer_rng = random.Random(7)


def write_prompts(body: dict[str, Any]) -> str | None:
    """A JSON array of new task sentences when `body` asks for new user messages like its
    examples, else None."""
    messages = body.get("messages") or []
    asked = _ASKED_TO_WRITE.search(str(messages[0].get("content", ""))) if messages else None
    if asked is None:
        return None
    shown = str(messages[-1].get("content", ""))
    styles = [t for t, pattern in zip(TEMPLATES, _PATTERNS, strict=True) if pattern.search(shown)]
    if not styles:
        return "[]"
    sentences = [
        _writer_rng.choice(styles).format(
            name=_writer_rng.choice(NAMES), age=_writer_rng.randint(18, 90), city=_writer_rng.choice(CITIES)
        )
        for _ in range(int(asked.group(1)))
    ]
    return orjson.dumps(sentences).decode()


def cloud_answer(body: dict[str, Any]) -> str:
    """What the simulated cloud answers: the exact extraction, or a polite fallback (and new
    task sentences when asked to write some)."""
    written = write_prompts(body)
    if written is not None:
        return written
    messages = body.get("messages") or []
    text = str(messages[-1].get("content", "")) if messages else ""
    for pattern in _PATTERNS:
        match = pattern.search(text)
        if match:
            found = match.groupdict()
            return orjson.dumps(
                {"name": found["name"], "age": int(found["age"]), "city": found["city"]}
            ).decode()
    return "I can only extract a name, an age and a city."
