"""Which pairs a job trains on, so that its size does not grow with traffic.

From the pairs left after the held-out split (which belongs to the judge):
- a validation slice, chosen by a salted prompt hash, whose loss tells training when to stop;
- the training set: at most `sample_cap(spec)` pairs, one per prompt, picked for prompt
  diversity (greedy max-min over MinHash estimates of character n-gram Jaccard distance: each
  pick is the prompt least like any picked so far), not by recency.
A retrain (one continuing from `init_adapter`) takes, in this order: the pairs the candidate
failed, new pairs (ones the previous adapter never saw), and a replay sample of old ones
(`replay_fraction` of the cap, or more when there are few new pairs).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import (
    Sample,
    chats_to_samples,
    prompt_key,
    prompt_messages,
    read_jsonl,
    records_to_samples,
)
from trainer.plan import sample_cap
from trainer.spec import TrainSpec

SHINGLE_CHARS = 4
MINHASH_PERMUTATIONS = 128
MIN_SAMPLES_FOR_VALIDATION = 10
_MERSENNE_31 = (1 << 31) - 1
_SEED = 20260101


@dataclass
class TrainingSet:
    """The pairs a job trains and validates on, and where they came from."""

    train: list[Sample]
    validation: list[Sample]
    counts: dict[str, int] = field(default_factory=dict)


# --- prompt text and similarity ---------------------------------------------------------


def prompt_text(sample: Sample) -> str:
    """What varies between a route's prompts: the non-system messages' text (a shared system
    prompt would make every pair look alike), lower-cased with runs of spaces collapsed."""
    messages = prompt_messages(sample)
    varying = [m for m in messages if m["role"] != "system"] or messages
    parts = [str(m.get("content") or "") for m in varying]
    parts += [str(call) for m in varying for call in m.get("tool_calls", [])]
    return " ".join(" ".join(parts).lower().split())


def shingles(text: str, size: int = SHINGLE_CHARS) -> np.ndarray:
    """Distinct character n-grams of `text`, as stable 31-bit hashes (at least one)."""
    grams = {text[i : i + size] for i in range(max(1, len(text) - size + 1))}
    return np.array(sorted(zlib.crc32(g.encode()) % _MERSENNE_31 for g in grams), dtype=np.uint64)


def minhash_signatures(texts: Sequence[str], permutations: int = MINHASH_PERMUTATIONS) -> np.ndarray:
    """(len(texts), permutations) MinHash signatures: the share of equal columns of two rows
    estimates the Jaccard similarity of their texts' n-gram sets."""
    rng = np.random.default_rng(_SEED)
    a = rng.integers(1, _MERSENNE_31, permutations, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE_31, permutations, dtype=np.uint64)
    rows = [((np.outer(shingles(t), a) + b) % _MERSENNE_31).min(axis=0) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, permutations), dtype=np.uint64)


def farthest_first(signatures: np.ndarray, count: int, anchors: np.ndarray | None = None) -> list[int]:
    """Indices of `count` rows picked greedily, each the one farthest (in estimated Jaccard
    distance) from every row picked before it and from `anchors`; ties go to the earlier row."""
    total = len(signatures)
    nearest = np.full(total, np.inf)
    for anchor in anchors if anchors is not None else ():
        nearest = np.minimum(nearest, 1.0 - (signatures == anchor).mean(axis=1))
    picked: list[int] = []
    for _ in range(min(count, total)):
        index = int(np.argmax(nearest))  # all infinite at first: row 0
        picked.append(index)
        nearest = np.minimum(nearest, 1.0 - (signatures == signatures[index]).mean(axis=1))
        nearest[index] = -1.0  # never picked twice
    return picked


def diverse_sample(pool: Sequence[Sample], count: int, already: Sequence[Sample] = ()) -> list[Sample]:
    """At most `count` pairs of `pool` (in pool order), as unlike each other and `already` as
    possible; all of them when the pool is that small."""
    if count <= 0:
        return []
    if len(pool) <= count:
        return list(pool)
    signatures = minhash_signatures([prompt_text(s) for s in pool])
    anchors = minhash_signatures([prompt_text(s) for s in already]) if already else None
    return [pool[i] for i in sorted(farthest_first(signatures, count, anchors))]


def one_per_prompt(samples: Iterable[Sample]) -> list[Sample]:
    """One pair per prompt: the latest answer wins (the cloud's current behaviour), kept at
    the position of the prompt's first appearance."""
    latest: dict[str, Sample] = {}
    for sample in samples:
        latest[prompt_key(sample)] = sample
    return list(latest.values())


# --- validation slice ---------------------------------------------------------------------


def validation_bucket(sample: Sample) -> float:
    """A stable number in [0, 1) from a salted prompt hash, independent of the held-out bucket."""
    digest = hashlib.sha256(b"validation:" + prompt_key(sample).encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def split_validation(
    pool: Sequence[Sample], spec: TrainSpec, keep: set[str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """(rest, validation): the lowest-bucket `validation_fraction` of the pool, at most
    `max_validation_samples`, none when the pool is too small to spare any. Prompts in `keep`
    (e.g. failed pairs) always stay for training."""
    candidates = [s for s in pool if prompt_key(s) not in (keep or set())]
    wanted = min(spec.max_validation_samples, round(len(pool) * spec.validation_fraction))
    if len(pool) < MIN_SAMPLES_FOR_VALIDATION or wanted <= 0:
        return list(pool), []
    chosen = {prompt_key(s) for s in sorted(candidates, key=validation_bucket)[:wanted]}
    rest = [s for s in pool if prompt_key(s) not in chosen]
    return rest, [s for s in pool if prompt_key(s) in chosen]


# --- the training set ---------------------------------------------------------------------


def select_training_set(
    pool: Sequence[Sample], spec: TrainSpec, failed: Sequence[Sample] = (), seen: set[str] | None = None
) -> TrainingSet:
    """The job's training and validation pairs from `pool` (the non-held-out pairs), with the
    `failed` pairs always in, and `seen` the prompt keys the previous adapter trained on."""
    failed = one_per_prompt(failed)
    failed_keys = {prompt_key(s) for s in failed}
    rest, validation = split_validation(one_per_prompt(pool), spec, failed_keys)
    rest = [s for s in rest if prompt_key(s) not in failed_keys]
    cap = sample_cap(spec)
    picked = failed[:cap]
    seen = seen or set()
    new = [s for s in rest if prompt_key(s) not in seen]
    old = [s for s in rest if prompt_key(s) in seen]
    replay_quota = min(len(old), round(spec.replay_fraction * cap)) if seen else 0
    fresh = diverse_sample(new, cap - len(picked) - replay_quota, picked)
    replay = diverse_sample(old, cap - len(picked) - len(fresh), picked + fresh)
    counts = {
        "pool": len(pool),
        "cap": cap,
        "failed": len(picked),
        "new": len(fresh),
        "replay": len(replay),
        "validation": len(validation),
    }
    return TrainingSet(picked + fresh + replay, validation, counts)


# --- inputs from files --------------------------------------------------------------------


def eval_row_to_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A judged eval row (`prompt`: the request's messages, `cloud_answer`: the cloud's text)
    as a chat whose answer is the cloud's."""
    return {"messages": [*row["prompt"], {"role": "assistant", "content": row.get("cloud_answer") or ""}]}


def load_failed(path: Path) -> list[Sample]:
    """Usable pairs from a failed-pairs JSONL whose lines are chats, log records or eval rows."""
    records, chats = [], []
    for line in read_jsonl(path):
        if isinstance(line, dict) and "request" in line and "response" in line:
            records.append(line)
        elif isinstance(line, dict) and isinstance(line.get("prompt"), list):
            chats.append(eval_row_to_chat(line))
        else:
            chats.append(line)
    return records_to_samples(records).samples + chats_to_samples(chats).samples


def seen_prompts(adapter_dir: Path | None, files: Iterable[str]) -> set[str]:
    """Prompt keys of the pairs a previous adapter trained and validated on (its folder keeps
    them); empty when there is none or it kept no data."""
    if adapter_dir is None:
        return set()
    keys: set[str] = set()
    for name in files:
        path = adapter_dir / name
        if path.is_file():
            keys.update(prompt_key(s) for s in chats_to_samples(read_jsonl(path)).samples)
    return keys
