"""The capped training set: one pair per prompt, diverse prompts, failed pairs first, replay on
a retrain, and a validation slice kept apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.trainer.samples import word_chat, write_jsonl
from trainer.dataset import prompt_key
from trainer.selection import (
    diverse_sample,
    load_failed,
    minhash_signatures,
    one_per_prompt,
    prompt_text,
    select_training_set,
    split_validation,
)
from trainer.spec import TrainSpec

TOPICS = [
    "the migration habits of arctic terns",
    "how to repair a leaking kitchen faucet",
    "the history of the byzantine empire",
    "writing a cover letter for a nursing job",
    "sorting algorithms in rust",
    "baking sourdough bread at high altitude",
    "the rules of cricket",
    "tax deductions for freelancers in canada",
    "training a puppy to stop biting",
    "the chemistry of lithium batteries",
]


def chat(prompt: str, answer: str = "ok") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    }


def family_pool(variants: int = 30) -> list[dict[str, Any]]:
    """Ten topics, each asked `variants` times in nearly the same words, topic by topic (so
    recency would pick one topic only)."""
    return [chat(f"Please tell me about {topic}, variant {i}.") for topic in TOPICS for i in range(variants)]


def topic_of(sample: dict[str, Any]) -> str:
    return next(topic for topic in TOPICS if topic in prompt_text(sample))


def test_the_capped_sample_covers_every_kind_of_prompt() -> None:
    picked = diverse_sample(family_pool(), 10)
    assert len(picked) == 10
    assert sorted(topic_of(s) for s in picked) == sorted(TOPICS)


def test_a_larger_cap_spreads_evenly_and_never_repeats_a_prompt() -> None:
    picked = diverse_sample(family_pool(), 40)
    assert len({prompt_key(s) for s in picked}) == 40
    per_topic = [sum(topic_of(s) == topic for s in picked) for topic in TOPICS]
    assert min(per_topic) >= 2, per_topic  # by recency it would be 30 of the first topic, 10 of the next


def test_one_pair_per_prompt_and_the_latest_answer_wins() -> None:
    pool = [chat("a", "old"), chat("b"), chat("a", "new"), chat("b")]
    kept = one_per_prompt(pool)
    assert [s["messages"][-1]["content"] for s in kept] == ["new", "ok"]


def test_training_set_is_deduplicated_capped_and_keeps_validation_apart() -> None:
    pool = family_pool() + family_pool()[:50]  # 50 exact repeats
    chosen = select_training_set(
        pool, TrainSpec(max_samples=20, validation_fraction=0.1, max_validation_samples=32)
    )
    train_keys = [prompt_key(s) for s in chosen.train]
    assert len(train_keys) == len(set(train_keys)) == 20
    assert len(chosen.validation) == 30  # 10% of the distinct pairs, under the cap of 32
    assert not set(train_keys) & {prompt_key(s) for s in chosen.validation}
    assert sorted({topic_of(s) for s in chosen.train}) == sorted(TOPICS)
    assert chosen.counts == {"pool": 350, "cap": 20, "failed": 0, "new": 20, "replay": 0, "validation": 30}


def test_a_retrain_takes_failed_then_new_then_replay_within_the_cap() -> None:
    old = [word_chat(f"old{i}") for i in range(100)]
    new = [word_chat(f"new{i}") for i in range(100)]
    failed = [word_chat("old3"), word_chat("failed-only")]
    seen = {prompt_key(s) for s in old}
    spec = TrainSpec(
        init_adapter=Path("/a/v1"), max_samples=300, retrain_examples_seen=40, replay_fraction=0.25
    )
    chosen = select_training_set(old + new, spec, failed, seen)

    assert chosen.counts["cap"] == 40 and len(chosen.train) == 40
    assert chosen.train[:2] == failed
    assert chosen.counts["failed"] == 2 and chosen.counts["replay"] == 10 and chosen.counts["new"] == 28
    assert all(prompt_key(s) not in seen for s in chosen.train[2:30])
    assert all(prompt_key(s) in seen for s in chosen.train[30:])


def test_few_new_pairs_leave_the_room_to_replay() -> None:
    old = [word_chat(f"old{i}") for i in range(100)]
    seen = {prompt_key(s) for s in old}
    spec = TrainSpec(init_adapter=Path("/a/v1"), retrain_examples_seen=40, validation_fraction=0.0)
    chosen = select_training_set([*old, word_chat("new")], spec, seen=seen)
    assert chosen.counts["new"] == 1 and chosen.counts["replay"] == 39


def test_small_pools_have_no_validation_slice_and_failed_pairs_never_validate() -> None:
    spec = TrainSpec(validation_fraction=0.5)
    assert split_validation([word_chat(f"w{i}") for i in range(9)], spec)[1] == []
    pool = [word_chat(f"w{i}") for i in range(20)]
    keep = {prompt_key(s) for s in pool[:15]}
    rest, validation = split_validation(pool, spec, keep)
    assert len(validation) == 5 and all(prompt_key(s) not in keep for s in validation)
    assert len(rest) == 15


def test_failed_pairs_load_from_eval_rows_records_and_chats(tmp_path: Path, make_record: Any) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "Say the word x"}], "cloud_answer": "x", "passed": 0},
        make_record(prompt="What is 3+3?", answer="6"),
        word_chat("y"),
    ]
    failed = load_failed(write_jsonl(tmp_path / "failed.jsonl", rows))
    assert [s["messages"][-1]["content"] for s in failed] == ["6", "x", "The word is y."]


def test_similar_prompts_have_similar_signatures() -> None:
    signatures = minhash_signatures(
        ["the cat sat on the mat", "the cat sat on a mat", "quantum chromodynamics"]
    )
    near = (signatures[0] == signatures[1]).mean()
    far = (signatures[0] == signatures[2]).mean()
    assert near > 0.4 and far < 0.1
