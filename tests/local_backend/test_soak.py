"""Soak: steady traffic to one adapter keeps one batch running for as long as it lasts.

Each finished job must leave that batch at once, with its adapter reference and whatever it
holds, or memory grows with every request and a retired adapter waits for the batch to end.
The first test drives the batch loop, the scheduler and the adapter registry in-process, one
decode step at a time, so it can count the job objects still alive; the second sends the
requests over HTTP to a real backend and watches its resident memory.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import httpx
import psutil
from transformers import AutoModelForCausalLM, AutoTokenizer

from local_backend import adapters
from local_backend.adapters import AdapterRegistry
from local_backend.batch import BatchRun, ModelHandle
from local_backend.jobs import GenerationJob, SequenceSpec
from local_backend.metrics import BackendMetrics
from local_backend.sampling import SamplingParams
from local_backend.scheduler import Scheduler
from tests.local_backend.support import RemoteBackend, torch_threads

REQUESTS = 2000
ARRIVALS_PER_STEP = 5
SHORT_TOKENS = 2
MAX_ROWS = 16
# The long request outlives the traffic, so one batch serves all of it.
KEEPER_TOKENS = REQUESTS // ARRIVALS_PER_STEP + 40
MIB = 1 << 20


class SteadyTraffic:
    """Short jobs for one adapter, queued a few before every decode step of the running batch."""

    def __init__(self, registry: AdapterRegistry, scheduler: Scheduler, prompt: list[int]) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.prompt = prompt
        self.alive: weakref.WeakSet[GenerationJob] = weakref.WeakSet()
        self.sent = 0
        self.released = 0

    def job(self, tokens: int) -> GenerationJob:
        """A job holding the adapter, as `Engine.submit` makes one."""
        job = GenerationJob(
            [SequenceSpec(self.prompt, tokens)], SamplingParams(temperature=0.0, ignore_eos=True), "alpha"
        )
        adapter = self.registry.acquire("alpha")
        job.adapter_id = adapter.adapter_id
        job.on_release = lambda: self._release(adapter)
        self.alive.add(job)
        return job

    def arrive(self) -> None:
        for _ in range(min(ARRIVALS_PER_STEP, REQUESTS - self.sent)):
            self.scheduler.submit(self.job(SHORT_TOKENS))
            self.sent += 1

    def _release(self, adapter: adapters.Adapter) -> None:
        self.registry.release(adapter)
        self.released += 1


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_finished_jobs_leave_a_batch_that_steady_traffic_keeps_running(
    lively_model_dir: Path, lora_dirs: dict[str, Path]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(lively_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    registry = AdapterRegistry()
    adapter = registry.new_adapter("alpha", lora_dirs["alpha"])
    adapters.load_into_model(model, adapter)
    registry.publish(adapter)
    adapters.activate(model, adapter.adapter_id)
    metrics = BackendMetrics()
    scheduler = Scheduler(max_queue=64, max_batch_size=MAX_ROWS, window_s=0.0, metrics=metrics)
    prompt = list(tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"])
    traffic = SteadyTraffic(registry, scheduler, prompt)
    keeper = traffic.job(KEEPER_TOKENS)
    samples: list[tuple[int, int, int]] = []  # (requests sent, jobs alive, adapter refs)
    memory: dict[str, int] = {}

    def between_steps() -> None:
        traffic.arrive()
        if traffic.sent % 100 == 0 and (not samples or samples[-1][0] != traffic.sent):
            gc.collect()
            samples.append((traffic.sent, len(traffic.alive), adapter.refs))
            memory.setdefault("warm" if traffic.sent >= 200 else "cold", rss())
            memory["last"] = rss()

    handle = ModelHandle(
        model=model,
        tokenizer=tokenizer,
        eos_ids=frozenset({tokenizer.eos_token_id}),
        max_model_len=512,
        pad_id=tokenizer.pad_token_id,
        device="cpu",
        vocab_size=model.get_output_embeddings().weight.shape[0],
    )
    run = BatchRun(handle, [keeper], metrics, between_steps, scheduler.take_joinable, max_rows=MAX_ROWS)
    with torch_threads(1):
        run.run()

    worst_alive = max(alive for _, alive, _ in samples)
    worst_refs = max(refs for _, _, refs in samples)
    grown = memory["last"] - memory["warm"]
    print(
        f"soak in-process: {traffic.sent} jobs, at most {worst_alive} alive and {worst_refs} adapter refs,"
        f" RSS {memory['warm'] / MIB:.1f} -> {memory['last'] / MIB:.1f} MiB"
    )
    assert samples[-1][0] == REQUESTS
    # Only the jobs in flight are alive (at most one batch of rows plus one step's arrivals),
    # however many went through before: finished jobs are not held until the batch ends.
    in_flight = MAX_ROWS + ARRIVALS_PER_STEP
    assert worst_alive <= in_flight, samples
    assert worst_refs <= in_flight, samples
    assert traffic.released == REQUESTS + 1
    assert grown < 8 * MIB, f"RSS grew by {grown / MIB:.1f} MiB over {REQUESTS} requests"


async def _send(client: httpx.AsyncClient, count: int, concurrency: int) -> None:
    body = {
        "model": "alpha",
        "prompt": "the quick brown fox",
        "max_tokens": SHORT_TOKENS,
        "temperature": 0,
    }
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def test_backend_memory_stays_flat_over_2000_requests_to_one_adapter(backend: RemoteBackend) -> None:
    process = psutil.Process(backend.process.pid)

    async def soak() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=backend.base_url, timeout=60) as client:
            # The JSON-object grammar is built in the background after start-up (~100 MiB at
            # its peak): a JSON request waits for it, so that build is not counted as growth.
            json_body = {
                "model": "alpha",
                "prompt": "{",
                "max_tokens": 2,
                "response_format": {"type": "json_object"},
            }
            assert (await client.post("/v1/completions", json=json_body)).status_code == 200
            await _send(client, 200, concurrency=8)  # warm-up: allocator pools, caches
            before = process.memory_info().rss
            await _send(client, REQUESTS - 200, concurrency=8)
            return before, process.memory_info().rss

    before, after = asyncio.run(soak())
    print(f"soak over HTTP: backend RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB")
    assert after - before < 24 * MIB, f"backend RSS grew by {(after - before) / MIB:.1f} MiB"
    assert backend.metric("understudy_backend_running_sequences") == 0
