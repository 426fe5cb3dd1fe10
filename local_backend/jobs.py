"""A generation job: what the HTTP side submits and how results flow back to it.

The worker thread pushes events into the job; the event loop reads them from a
`GenerationStream`. Nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from local_backend.constrained import Grammar
from local_backend.errors import BackendError
from local_backend.sampling import SamplingParams


@dataclass(frozen=True)
class SequenceSpec:
    """One sequence to generate: a choice of a chat, or one prompt x one choice of a completion."""

    prompt_ids: list[int]
    max_tokens: int
    seed: int | None = None


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class SequenceFinished:
    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class JobFailed:
    error: BackendError


Event = TextDelta | SequenceFinished | JobFailed


@dataclass
class SequenceResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(eq=False)
class GenerationJob:
    """Sequences that share an adapter and sampling parameters (one HTTP request)."""

    sequences: list[SequenceSpec]
    params: SamplingParams
    model_name: str
    adapter_id: str | None = None
    grammar: Grammar | None = None
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    on_release: Callable[[], None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _queue: asyncio.Queue[list[Event]] = field(default_factory=asyncio.Queue)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens the model reads: each distinct prompt once (choices share a prefill)."""
        return sum(len(p) for p in {tuple(s.prompt_ids) for s in self.sequences})

    def cancel(self) -> None:
        """Ask the worker to stop this job's sequences at the next decode step."""
        self.cancelled = True

    def release(self) -> None:
        """Run `on_release` once, when the job is over however it ended (frees its adapter)."""
        callback, self.on_release = self.on_release, None
        if callback is not None:
            callback()

    def emit(self, events: list[Event]) -> None:
        """Hand events to the event loop. Called from the worker thread."""
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, events)
        except RuntimeError:  # the loop closed between the check and the call: nobody listens
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the job, ending after the last sequence finishes or the job fails."""
        remaining = len(self.sequences)
        while remaining:
            for event in await self._queue.get():
                yield event
                if isinstance(event, JobFailed):
                    return
                if isinstance(event, SequenceFinished):
                    remaining -= 1

    async def collect(self) -> list[SequenceResult]:
        """Wait for the whole job; raise its error if it failed."""
        results = [SequenceResult() for _ in self.sequences]
        async for event in self.events():
            if isinstance(event, JobFailed):
                raise event.error
            result = results[event.index]
            if isinstance(event, TextDelta):
                result.text += event.text
            else:
                result.finish_reason = event.finish_reason
                result.completion_tokens = event.completion_tokens
        return results


async def cancel_unless_finished(job: GenerationJob, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay a job's response chunks; if the client stops reading before the end (a
    disconnect closes the generator), cancel the job so its sequences stop generating."""
    finished = False
    try:
        async for chunk in chunks:
            yield chunk
        finished = True
    finally:
        if not finished:
            job.cancel()
