"""Unit tests of the backend's pieces that need no server: detokenizing, stop strings,
sampling, the scheduler's batching and back-pressure, adapter retirement, grammars."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from local_backend.adapters import AdapterRegistry
from local_backend.constrained import GrammarCompiler, TokenGuide
from local_backend.detokenize import IncrementalDetokenizer, StopMatcher
from local_backend.errors import InvalidSchema, ModelNotFound, Overloaded
from local_backend.jobs import GenerationJob, SequenceSpec
from local_backend.metrics import BackendMetrics
from local_backend.sampling import SamplingParams, TokenSampler, _top_p_filter
from local_backend.scheduler import Scheduler


@pytest.fixture(scope="module")
def tokenizer(lively_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lively_model_dir)


def test_incremental_detokenizer_rebuilds_the_full_decode(tokenizer: Any) -> None:
    rng = random.Random(1)
    prompt = tokenizer("hello world")["input_ids"]
    for _ in range(20):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(40)]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        text = "".join(detok.push(t) for t in ids) + detok.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_holds_back_partial_utf8(tokenizer: Any) -> None:
    ids = tokenizer("é€", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) + detok.flush() == "é€"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello", " wor", "ld"], ("world",), "Hello ", True),
        (["ab", "c", "d"], ("cx",), "abcd", False),
        (["the END", " more"], ("END",), "the ", True),
        (["x", "Y", "Z"], ("YZ", "Q"), "x", True),
        (["no stop here"], (), "no stop here", False),
    ],
)
def test_stop_matcher_never_leaks_a_stop_string(
    pieces: list[str], stops: tuple[str, ...], emitted: str, stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (emitted, stopped)


def test_top_p_keeps_the_smallest_sufficient_set() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = _top_p_filter(probs.clone(), 0.75)
    assert kept.tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])


def test_seeded_sampler_is_reproducible_and_greedy_is_argmax() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))

    def draws(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(temperature=1.0), seed)
        return [sampler.choose(logits) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert TokenSampler(SamplingParams(temperature=0.0), None).choose(logits) == int(logits.argmax())


def test_frequency_penalty_lowers_repeated_tokens() -> None:
    sampler = TokenSampler(SamplingParams(temperature=0.0, frequency_penalty=2.0), 0)
    for _ in range(3):
        sampler.observe(5, 10)
    logits = torch.zeros(10)
    sampler.adjust(logits)
    assert logits[5] == pytest.approx(-6.0)
    assert logits[4] == 0.0


def _job(adapter: str | None, n: int = 1) -> GenerationJob:
    job = GenerationJob([SequenceSpec([1, 2], 4)] * n, SamplingParams(), "m", adapter_id=adapter)
    return job


def test_scheduler_batches_jobs_of_the_same_adapter_together() -> None:
    scheduler = Scheduler(max_queue=10, max_batch_size=4, window_s=0.0, metrics=BackendMetrics())
    jobs = [_job("a"), _job(None), _job("a", n=2), _job("a"), _job(None)]
    for job in jobs:
        scheduler.submit(job)
    first = scheduler.next_work()
    second = scheduler.next_work()
    assert first is not None and second is not None
    assert first.jobs == [jobs[0], jobs[2], jobs[3]]  # 1 + 2 + 1 sequences = max_batch_size
    assert second.jobs == [jobs[1], jobs[4]]
    assert scheduler.depth == 0


def test_scheduler_waits_the_batch_window_for_companions() -> None:
    scheduler = Scheduler(max_queue=10, max_batch_size=8, window_s=0.3, metrics=BackendMetrics())
    first, late = _job("a"), _job("a")
    scheduler.submit(first)
    threading.Timer(0.05, scheduler.submit, args=(late,)).start()
    work = scheduler.next_work()
    assert work is not None and work.jobs == [first, late]


def test_scheduler_refuses_when_full_and_forgets_cancelled_jobs() -> None:
    metrics = BackendMetrics()
    scheduler = Scheduler(max_queue=2, max_batch_size=8, window_s=0.0, metrics=metrics)
    released: list[str] = []
    kept, dropped = _job(None), _job(None)
    dropped.on_release = lambda: released.append("dropped")
    scheduler.submit(kept)
    scheduler.submit(dropped)
    with pytest.raises(Overloaded):
        scheduler.submit(_job(None))
    dropped.cancel()
    work = scheduler.next_work()
    assert work is not None and work.jobs == [kept]
    assert released == ["dropped"]


def test_scheduler_control_ops_run_on_the_worker_and_return_results() -> None:
    scheduler = Scheduler(max_queue=2, max_batch_size=8, window_s=0.0, metrics=BackendMetrics())
    future = scheduler.call(lambda: 41 + 1)
    work = scheduler.next_work()
    assert work is not None and work.jobs == [] and len(work.controls) == 1
    work.controls[0].run()
    assert future.result(timeout=1) == 42


def test_adapter_registry_retires_an_adapter_only_when_unused() -> None:
    registry = AdapterRegistry()
    old = registry.new_adapter("route", Path("/v1"))
    registry.publish(old)
    held = registry.acquire("route")
    registry.publish(registry.new_adapter("route", Path("/v2")))
    assert registry.take_unused_retired() == []  # a job still runs on v1
    registry.release(held)
    assert registry.take_unused_retired() == [old]
    assert registry.acquire("route").path == Path("/v2")
    registry.withdraw("route")
    with pytest.raises(ModelNotFound):
        registry.acquire("route")


def _walk(guide: TokenGuide, vocab: int, eos: int, rng: torch.Generator) -> list[int]:
    """Random tokens through the guide, as a model with random logits would pick them."""
    ids: list[int] = []
    while len(ids) < 400:
        logits = torch.randn(vocab, generator=rng)
        guide.mask_logits(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))
        if token == eos or guide.is_finished():
            break
        guide.advance(token)
        ids.append(token)
    return ids


def test_json_schema_guide_only_allows_valid_documents(tokenizer: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer"},
            "mood": {"enum": ["happy", "sad"]},
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": False,
    }
    grammar = GrammarCompiler(tokenizer).json_schema(schema)
    vocab = len(tokenizer)
    for seed in range(5):
        guide = TokenGuide(grammar, vocab)
        ids = _walk(guide, vocab, tokenizer.eos_token_id, torch.Generator().manual_seed(seed))
        document = json.loads(tokenizer.decode(ids))
        jsonschema.validate(document, schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strange"},
        {"type": "object", "properties": {"a": {"$ref": "#/missing"}}},
        ["not", "a", "schema"],
    ],
)
def test_invalid_schemas_are_refused(tokenizer: Any, schema: Any) -> None:
    with pytest.raises(InvalidSchema):
        GrammarCompiler(tokenizer).json_schema(schema)


def test_grammar_cache_on_disk_is_reused(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("local_backend.constrained._DISK_CACHE_MIN_BUILD_S", 0.0)
    schema = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
    GrammarCompiler(tokenizer, cache_dir=tmp_path).json_schema(schema)
    assert len(list(tmp_path.glob("index-*.pkl"))) == 1
    grammar = GrammarCompiler(tokenizer, cache_dir=tmp_path).json_schema(schema)
    guide = TokenGuide(grammar, len(tokenizer))
    ids = _walk(guide, len(tokenizer), tokenizer.eos_token_id, torch.Generator().manual_seed(0))
    assert json.loads(tokenizer.decode(ids)) in ({"x": True}, {"x": False})
