"""The batch loop in-process on the tiny model: rows that join a running batch, or leave
it early, decode exactly as `model.generate` does for each prompt alone."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from local_backend.batch import BatchRun, ModelHandle
from local_backend.jobs import GenerationJob, SequenceResult, SequenceSpec
from local_backend.metrics import BackendMetrics
from local_backend.sampling import SamplingParams
from tests.local_backend.support import torch_threads


def handle_for(model: Any, tokenizer: Any) -> ModelHandle:
    return ModelHandle(
        model=model,
        tokenizer=tokenizer,
        eos_ids=frozenset({tokenizer.eos_token_id}),
        max_model_len=512,
        pad_id=tokenizer.pad_token_id,
        device="cpu",
        vocab_size=model.get_output_embeddings().weight.shape[0],
    )


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(chat, add_special_tokens=False)["input_ids"])


def generate_alone(model: Any, tokenizer: Any, ids: list[int], tokens: int) -> str:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def greedy_job(ids: list[int], tokens: int, loop: asyncio.AbstractEventLoop) -> GenerationJob:
    job = GenerationJob([SequenceSpec(ids, tokens)], SamplingParams(temperature=0.0, ignore_eos=True), "tiny")
    job.bind(loop)
    return job


def test_rows_joining_and_leaving_a_running_batch_decode_as_if_alone(tiny_reference: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_reference
    loop = asyncio.new_event_loop()
    short = greedy_job(prompt_ids(tokenizer, "hi"), 60, loop)
    # Joins after 3 steps with a prompt longer than the running cache: the running row is padded.
    long = greedy_job(prompt_ids(tokenizer, "the quick brown fox jumps " * 8), 12, loop)
    # Joins after 20 steps, once `long` has left: leading padding columns were trimmed meanwhile.
    medium = greedy_job(prompt_ids(tokenizer, "the capital of France"), 25, loop)
    arrivals = {3: [long], 20: [medium]}
    steps = [0]

    def take_more(adapter_id: str | None, room: int) -> list[GenerationJob]:
        steps[0] += 1
        return arrivals.pop(steps[0], [])

    metrics = BackendMetrics()
    with torch_threads(1):
        BatchRun(handle_for(model, tokenizer), [short], metrics, lambda: None, take_more, max_rows=4).run()
        for job, tokens in ((short, 60), (long, 12), (medium, 25)):
            result: list[SequenceResult] = loop.run_until_complete(job.collect())
            expected = generate_alone(model, tokenizer, job.sequences[0].prompt_ids, tokens)
            assert result[0].text == expected
            assert (result[0].finish_reason, result[0].completion_tokens) == ("length", tokens)
    loop.close()
    assert not arrivals, "the joining jobs were never offered to the batch"
    step_count = metrics.registry.get_sample_value("understudy_backend_batch_size_count") or 0
    alone = metrics.registry.get_sample_value("understudy_backend_batch_size_bucket", {"le": "1.0"}) or 0
    assert step_count > alone > 0, "some steps should have decoded several rows together"


def test_cancelled_row_leaves_without_disturbing_the_others(tiny_reference: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_reference
    loop = asyncio.new_event_loop()
    kept = greedy_job(prompt_ids(tokenizer, "hello world"), 30, loop)
    dropped = greedy_job(prompt_ids(tokenizer, "the quick brown fox " * 3), 30, loop)
    calls = [0]

    def cancel_after_five_steps() -> None:
        calls[0] += 1
        if calls[0] == 5:
            dropped.cancel()

    with torch_threads(1):
        BatchRun(
            handle_for(model, tokenizer), [kept, dropped], BackendMetrics(), cancel_after_five_steps
        ).run()
        result = loop.run_until_complete(kept.collect())
        assert result[0].text == generate_alone(model, tokenizer, kept.sequences[0].prompt_ids, 30)
    loop.close()
    assert calls[0] == 29  # no step was wasted after `kept` finished


def test_a_finished_job_is_released_while_the_batch_runs_on(tiny_reference: tuple[Any, Any]) -> None:
    """Its adapter reference (and everything the job holds) must not wait for the batch to end."""
    model, tokenizer = tiny_reference
    loop = asyncio.new_event_loop()
    long = greedy_job(prompt_ids(tokenizer, "hello world"), 20, loop)
    short = greedy_job(prompt_ids(tokenizer, "the capital of France"), 3, loop)
    cancelled = greedy_job(prompt_ids(tokenizer, "the quick brown fox"), 20, loop)
    released: list[str] = []
    short.on_release = lambda: released.append("short")
    cancelled.on_release = lambda: released.append("cancelled")
    seen: dict[int, tuple[list[str], list[GenerationJob]]] = {}
    metrics = BackendMetrics()

    def between_steps() -> None:
        step = len(seen) + 1
        if step == 4:
            cancelled.cancel()
        seen[step] = (list(released), run.jobs)

    run = BatchRun(handle_for(model, tokenizer), [long, short, cancelled], metrics, between_steps, max_rows=4)
    with torch_threads(1):
        run.run()
    loop.close()
    # `short` has its 3 tokens after two decode steps; `cancelled` leaves at the step after its cancel.
    assert seen[3] == (["short"], [long, cancelled])
    assert seen[5] == (["short", "cancelled"], [long])
    assert run.jobs == []
    assert metrics.registry.get_sample_value("understudy_backend_cancelled_requests_total") == 1
