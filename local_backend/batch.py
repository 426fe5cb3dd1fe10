"""One batch on the model: left-padded prefill, then one decode step at a time for every
sequence together, each sequence leaving the batch (and the KV cache) when it finishes.
A job leaves with its last sequence: the batch releases it (and so its adapter) at once,
not when the batch ends, because steady traffic can keep one batch running for hours.

Runs on the worker thread only. Each sequence has its own sampler (seed, temperature,
top-p), detokenizer, stop matcher and, for structured output, grammar guide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from local_backend.constrained import TokenGuide
from local_backend.detokenize import IncrementalDetokenizer, StopMatcher
from local_backend.jobs import Event, GenerationJob, SequenceFinished, SequenceSpec, TextDelta
from local_backend.kvcache import BatchCache
from local_backend.loading import Precision
from local_backend.metrics import BackendMetrics
from local_backend.sampling import TokenSampler


@dataclass
class _Row:
    """One sequence while it is in the batch."""

    job: GenerationJob
    index: int
    spec: SequenceSpec
    sampler: TokenSampler
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    guide: TokenGuide | None
    generated: int = 0
    next_token: int = -1
    finish_reason: str | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def plain_greedy(self) -> bool:
        params = self.sampler.params
        return params.greedy and self.guide is None and not params.logit_bias and not params.needs_history


@dataclass
class _OpenJob:
    """A job the batch still holds: how many of its sequences are still generating."""

    rows_left: int
    first_token_seen: bool = False


@dataclass
class ModelHandle:
    """What a batch needs to know about the loaded model."""

    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    max_model_len: int
    pad_id: int
    device: str
    vocab_size: int
    precision: Precision = field(default_factory=Precision)


TakeMore = Callable[[str | None, int], list[GenerationJob]]


class BatchRun:
    """Generates every sequence of `jobs` to completion (or cancellation). Between decode
    steps, waiting jobs for the same adapter join the batch (continuous batching)."""

    def __init__(
        self,
        handle: ModelHandle,
        jobs: list[GenerationJob],
        metrics: BackendMetrics,
        between_steps: Callable[[], None],
        take_more: TakeMore | None = None,
        max_rows: int = 1,
    ) -> None:
        self._h = handle
        self._metrics = metrics
        self._between_steps = between_steps
        self._take_more = take_more
        self._max_rows = max_rows
        self._adapter_id = jobs[0].adapter_id if jobs else None
        # Every job the batch holds, in arrival order; a job leaves when its last row does.
        self._open: dict[GenerationJob, _OpenJob] = {job: _OpenJob(len(job.sequences)) for job in jobs}

    @property
    def jobs(self) -> list[GenerationJob]:
        """The jobs still in the batch; finished ones have been released already."""
        return list(self._open)

    def run(self) -> None:
        with torch.inference_mode():
            rows, state = self._start(self.jobs)
            while rows:
                # Adapter loads create parameters: they must not become inference tensors.
                with torch.inference_mode(False):
                    self._between_steps()
                rows = self._admit(rows, state)
                state.extend()
                step_ids = torch.tensor([r.next_token for r in rows], device=self._h.device)[:, None]
                logits = self._forward(step_ids, state.mask, state.positions[:, None], state.cache)
                rows = self._advance(rows, state, logits)

    def release_all(self) -> None:
        """Release the jobs still held (after a failure or a stop)."""
        for job in self.jobs:
            self._release(job)

    def _start(self, jobs: list[GenerationJob]) -> tuple[list[_Row], BatchCache]:
        """Prefill the jobs' prompts and pick their first tokens."""
        for job in jobs:
            self._open.setdefault(job, _OpenJob(len(job.sequences)))
        rows = [
            self._new_row(job, i, spec)
            for job in jobs
            if not job.cancelled
            for i, spec in enumerate(job.sequences)
        ]
        for job in jobs:
            if job.cancelled or not job.sequences:
                self._release(job)
        if not rows:
            return [], BatchCache(DynamicCache(), torch.zeros((0, 0), dtype=torch.long), torch.zeros(0))
        logits, state = self._prefill(rows)
        return self._advance(rows, state, logits), state

    def _admit(self, rows: list[_Row], state: BatchCache) -> list[_Row]:
        """Let waiting jobs for this adapter join, if the batch has room."""
        room = self._max_rows - len(rows)
        if self._take_more is None or room <= 0 or not state.joinable:
            return rows
        jobs = self._take_more(self._adapter_id, room)
        if not jobs:
            return rows
        joined, joined_state = self._start(jobs)
        if joined:
            state.absorb(joined_state)
        return rows + joined

    def _advance(self, rows: list[_Row], state: BatchCache, logits: torch.Tensor) -> list[_Row]:
        """Choose and record each row's next token; drop the rows that are done."""
        tokens = self._choose_tokens(rows, logits)
        for row, token in zip(rows, tokens, strict=True):
            row.next_token = token
            self._accept(row, token)
        self._flush_events(rows)
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None and not r.job.cancelled]
        if len(keep) < len(rows):
            if keep:
                state.keep(keep)
                state.trim()
            kept = set(keep)
            self._leave([row for i, row in enumerate(rows) if i not in kept])
            rows = [rows[i] for i in keep]
        return rows

    def _leave(self, rows: list[_Row]) -> None:
        """Rows that left the batch; a job whose last row left is released now."""
        for row in rows:
            progress = self._open.get(row.job)
            if progress is None:
                continue
            progress.rows_left -= 1
            if progress.rows_left <= 0:
                self._release(row.job)

    def _release(self, job: GenerationJob) -> None:
        if self._open.pop(job, None) is None:
            return  # released already
        if job.cancelled:
            self._metrics.cancelled.inc()
        job.release()

    def _new_row(self, job: GenerationJob, index: int, spec: SequenceSpec) -> _Row:
        tokenizer = self._h.tokenizer
        guide = TokenGuide(job.grammar, self._h.vocab_size) if job.grammar else None
        return _Row(
            job=job,
            index=index,
            spec=spec,
            sampler=TokenSampler(job.params, spec.seed),
            detokenizer=IncrementalDetokenizer(tokenizer, spec.prompt_ids),
            stops=StopMatcher(job.params.stop),
            guide=guide,
        )

    def _prefill(self, rows: list[_Row]) -> tuple[torch.Tensor, BatchCache]:
        """Run each distinct prompt once (n choices share one), then copy its cache rows."""
        distinct: dict[tuple[int, ...], int] = {}
        row_to_prompt = [distinct.setdefault(tuple(r.spec.prompt_ids), len(distinct)) for r in rows]
        prompts = list(distinct)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._h.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._h.model.config)
        device = self._h.device
        mask, positions = mask.to(device), positions.to(device)
        with self._h.precision.prefill():
            logits = self._forward(ids.to(device), mask, positions, cache)
        state = BatchCache(cache, mask, positions[:, -1])
        if len(prompts) < len(rows):
            state.keep(row_to_prompt)
            logits = logits[torch.tensor(row_to_prompt, device=device)]
        return logits, state

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self._h.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _choose_tokens(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        if all(r.plain_greedy and not self._must_block_eos(r) for r in rows):
            return [int(t) for t in logits.argmax(dim=-1).tolist()]
        return [self._choose_one(row, logits[i]) for i, row in enumerate(rows)]

    def _choose_one(self, row: _Row, logits: torch.Tensor) -> int:
        row.sampler.adjust(logits)
        if self._must_block_eos(row):
            logits[list(self._h.eos_ids)] = float("-inf")
        if row.guide is not None:
            row.guide.mask_logits(logits)
        return row.sampler.choose(logits)

    def _must_block_eos(self, row: _Row) -> bool:
        params = row.sampler.params
        blocked = params.ignore_eos or row.generated < params.min_tokens
        return blocked and (row.guide is None or not row.guide.is_finished())

    def _accept(self, row: _Row, token: int) -> None:
        """Record one generated token: text, stop checks, finish reason."""
        row.generated += 1
        row.sampler.observe(token, self._h.vocab_size)
        if token in self._h.eos_ids and not self._must_block_eos(row):
            self._finish(row, "stop")
            return
        if row.guide is not None:
            row.guide.advance(token)
        text, stopped = row.stops.feed(row.detokenizer.push(token))
        self._add_text(row, text)
        if stopped:
            self._finish(row, "stop", flush=False)
        elif row.guide is not None and row.guide.is_finished():
            self._finish(row, "stop")
        elif (
            row.generated >= row.spec.max_tokens
            or len(row.spec.prompt_ids) + row.generated >= self._h.max_model_len
        ):
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        if flush:
            text, stopped = row.stops.feed(row.detokenizer.flush())
            self._add_text(row, text if stopped else text + row.stops.flush())
        row.finish_reason = reason
        row.events.append(SequenceFinished(row.index, reason, row.generated))

    def _add_text(self, row: _Row, text: str) -> None:
        if text:
            row.events.append(TextDelta(row.index, text))

    def _flush_events(self, rows: list[_Row]) -> None:
        """Send this step's events, one hand-off per job; count tokens and first-token times."""
        by_job: dict[int, tuple[GenerationJob, list[Event]]] = {}
        for row in rows:
            if row.events:
                by_job.setdefault(id(row.job), (row.job, []))[1].extend(row.events)
                row.events = []
        now = time.monotonic()
        for job, events in by_job.values():
            progress = self._open.get(job)
            if progress is not None and not progress.first_token_seen:
                progress.first_token_seen = True
                self._metrics.time_to_first_token.observe(now - job.created)
            job.emit(events)
        self._metrics.record_step(rows[0].job.model_name, len(rows))
        self._metrics.batch_size.observe(len(rows))
        self._metrics.running_sequences.set(len(rows))
