"""The one seam between HTTP and the model.

`Engine` loads the base model, owns the worker thread that runs every forward pass, keeps
the LoRA adapters, and takes jobs through a bounded queue that batches them per adapter.
The HTTP side only calls `submit`, `load_adapter`, `unload_adapter` and the small
read-only helpers; it never touches the model.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from local_backend import adapters
from local_backend.adapters import Adapter, AdapterRegistry
from local_backend.batch import BatchRun, ModelHandle
from local_backend.constrained import Grammar, GrammarCompiler
from local_backend.errors import (
    AdapterLoadError,
    BackendError,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
)
from local_backend.jobs import GenerationJob, JobFailed
from local_backend.loading import Precision, load_model
from local_backend.metrics import BackendMetrics
from local_backend.scheduler import ControlOp, Scheduler
from local_backend.selftest import SelfTestResult, lora_self_test
from local_backend.settings import Settings

logger = logging.getLogger(__name__)

_UNKNOWN = "\0unknown"  # the model's active adapter is not known (after a load or delete)


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServedModel:
    """One entry of `/v1/models`: the base model or an adapter on it."""

    name: str
    root: str
    parent: str | None
    created: int


class Engine:
    """The base model, its adapters, and the batching worker in front of them."""

    def __init__(self, settings: Settings, metrics: BackendMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = EngineState.LOADING
        self.error: str | None = None
        # Whether this library stack can serve LoRA adapters (None until the model loads).
        self.lora_selftest: SelfTestResult | None = None
        self.created = int(time.time())
        self._handle: ModelHandle | None = None
        self._compiler: GrammarCompiler | None = None
        self._base_names: frozenset[str] = frozenset({settings.model_name, settings.model})
        self._root = settings.model
        self._registry = AdapterRegistry()
        self._scheduler = Scheduler(
            settings.max_queue, settings.max_batch_size, settings.batch_window_ms / 1000, metrics
        )
        self._worker: threading.Thread | None = None
        self._batch_adapter: str | None = None
        self._active_adapter: str | None = _UNKNOWN

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load the model and the startup adapters, then start the worker. Blocking."""
        try:
            self._load()
        except Exception as exc:  # reported through /health and the CLI's exit status
            logger.exception("loading the model %s failed", self.settings.model)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            raise
        self.state = EngineState.READY
        handle = self._require_handle()
        logger.info(
            "model %s ready (max_model_len=%d, dtype %s, quantize %s)",
            self.model_name,
            self.max_model_len,
            str(handle.model.dtype).removeprefix("torch."),
            handle.precision.quantize,
        )
        threading.Thread(target=self._warm_json_grammar, name="grammar-warmup", daemon=True).start()

    def _load(self) -> None:
        s = self.settings
        if s.threads is not None:
            torch.set_num_threads(s.threads)
        model, tokenizer, source = load_model(s.model, s.model_cache_root, s.device, s.dtype, s.quantize)
        self._handle = _model_handle(model, tokenizer, s.max_model_len)
        # Before any real adapter: the throwaway one must leave the bare model behind.
        self.lora_selftest = lora_self_test(model, tokenizer)
        self._base_names = self._base_names | {source.name}
        self._root = str(source.folder)
        self._compiler = GrammarCompiler(tokenizer, cache_dir=s.outlines_cache_dir)
        for name, path in s.loras.items():
            self._load_adapter_now(self._new_adapter(name, path), replace=False)
        self._warm_up()
        self._worker = threading.Thread(target=self._work, name="generation-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Refuse new work, fail the waiting jobs, stop the running batch at its next step."""
        self.state = EngineState.STOPPED
        for job in self._scheduler.stop():
            job.emit([JobFailed(NotReady("the local backend is shutting down"))])
            job.release()
        if self._worker is not None:
            self._worker.join(timeout=5)

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY and self._worker is not None and self._worker.is_alive()

    # ------------------------------------------------------------------ model facts

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    def max_model_len(self) -> int:
        return self._require_handle().max_model_len

    @property
    def tokenizer(self) -> Any:
        return self._require_handle().tokenizer

    def served_models(self) -> list[ServedModel]:
        base = ServedModel(self.model_name, self._root, None, self.created)
        loras = [ServedModel(a.name, str(a.path), self.model_name, a.created) for a in self._registry.names()]
        return [base, *loras]

    def check_model(self, name: str) -> None:
        """Raise ModelNotFound unless `name` is the base model or a loaded adapter."""
        self._require_ready()
        if name not in self._base_names and name not in self._registry:
            raise ModelNotFound(f"The model or LoRA adapter '{name}' does not exist.", param="model")

    # ------------------------------------------------------------------ request preparation

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """Prompt token ids of a chat, through the model's own chat template."""
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as exc:
            raise InvalidRequest(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def grammar(self, schema: dict[str, Any]) -> Grammar:
        """The compiled constraint for a JSON schema (blocking: call it off the event loop)."""
        self._require_ready()
        assert self._compiler is not None
        return self._compiler.json_schema(schema)

    # ------------------------------------------------------------------ jobs

    def submit(self, job: GenerationJob, model: str) -> None:
        """Queue `job` on the base model or the adapter called `model`. Call from the loop."""
        self._require_ready()
        if model not in self._base_names:
            adapter = self._registry.acquire(model)
            job.adapter_id = adapter.adapter_id
            job.on_release = lambda: self._registry.release(adapter)
        job.bind(asyncio.get_running_loop())
        try:
            self._scheduler.submit(job)
        except Overloaded:
            job.release()
            raise
        self.metrics.prompt_tokens.labels(job.model_name).inc(job.prompt_tokens)

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        """Load a LoRA adapter from a peft folder; with `replace`, swap one already loaded."""
        self._require_ready()
        if name in self._base_names:
            raise AdapterLoadError(f"'{name}' is the base model's name", param="lora_name")
        if name in self._registry and not replace:
            raise AdapterLoadError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        folder = Path(path)  # relative paths resolve against the backend's working directory
        adapter = self._new_adapter(name, folder)
        await asyncio.to_thread(adapters.check_adapter_folder, adapter.path)
        await self._on_worker(lambda: self._load_adapter_now(adapter, replace))

    async def unload_adapter(self, name: str) -> None:
        """Stop serving `name` now; its weights leave the model when no job uses them."""
        self._require_ready()
        self._registry.withdraw(name)
        self.metrics.adapters_loaded.set(len(self._registry.names()))
        await self._on_worker(self._delete_unused_adapters)

    def _new_adapter(self, name: str, path: Path) -> Adapter:
        return self._registry.new_adapter(name, path)

    def _load_adapter_now(self, adapter: Adapter, replace: bool) -> None:
        if adapter.name in self._registry and not replace:
            raise AdapterLoadError(f"The lora adapter '{adapter.name}' has already been loaded.")
        adapters.check_adapter_folder(adapter.path)
        model = self._require_handle().model
        self._active_adapter = _UNKNOWN
        adapters.load_into_model(model, adapter)
        self._registry.publish(adapter)
        self.metrics.adapters_loaded.set(len(self._registry.names()))
        self._delete_unused_adapters()
        logger.info("LoRA adapter %s loaded from %s as %s", adapter.name, adapter.path, adapter.adapter_id)

    def _delete_unused_adapters(self) -> None:
        model = self._require_handle().model
        for adapter in self._registry.take_unused_retired():
            adapters.delete_from_model(model, adapter.adapter_id)
            self._active_adapter = _UNKNOWN
            logger.info("LoRA adapter %s (%s) removed from the model", adapter.name, adapter.adapter_id)

    async def _on_worker(self, fn: Any) -> Any:
        return await asyncio.wrap_future(self._scheduler.call(fn))

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while (work := self._scheduler.next_work()) is not None:
            self._run_controls(work.controls)
            if work.jobs:
                self._run_batch(work.jobs)
                self._delete_unused_adapters()

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        self._batch_adapter = jobs[0].adapter_id
        run = BatchRun(
            self._require_handle(),
            jobs,
            self.metrics,
            self._between_steps,
            take_more=self._scheduler.take_joinable,
            max_rows=self.settings.max_batch_size,
        )
        try:
            self._activate(self._batch_adapter)
            run.run()
        except Exception as exc:  # a failed batch must not kill the worker; its clients get a 500
            logger.exception("generation failed")
            error = exc if isinstance(exc, BackendError) else GenerationFailed(f"generation failed: {exc}")
            for job in run.jobs:  # the unfinished ones
                job.emit([JobFailed(error)])
        finally:
            self.metrics.running_sequences.set(0)
            run.release_all()  # finished jobs were released as they finished

    def _between_steps(self) -> None:
        """Adapter loads and unloads run here, between two decode steps of the running batch."""
        if self.state is EngineState.STOPPED:
            raise GenerationFailed("the local backend is shutting down")
        ops = self._scheduler.take_controls()
        if ops:
            self._run_controls(ops)
            self._activate(self._batch_adapter)

    def _run_controls(self, ops: list[ControlOp]) -> None:
        for op in ops:
            op.run()

    def _activate(self, adapter_id: str | None) -> None:
        if adapter_id != self._active_adapter:
            adapters.activate(self._require_handle().model, adapter_id)
            self._active_adapter = adapter_id

    def _warm_up(self) -> None:
        """One forward pass before serving, so the first request does not pay for allocations."""
        handle = self._require_handle()
        ids = torch.tensor([[handle.pad_id]], device=handle.device)
        with torch.inference_mode():
            handle.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def _warm_json_grammar(self) -> None:
        # The generic JSON-object grammar takes seconds to build on a real vocabulary.
        if self._compiler is None:
            return
        try:
            self._compiler.json_object()
        except BackendError:
            logger.exception("building the JSON object grammar failed")

    # ------------------------------------------------------------------ helpers

    def _require_handle(self) -> ModelHandle:
        if self._handle is None:
            raise NotReady("the model is still loading")
        return self._handle

    def _require_ready(self) -> None:
        if self.state is EngineState.FAILED:
            raise GenerationFailed(f"the model failed to load: {self.error}")
        if not self.ready:
            raise NotReady(
                "the model is still loading"
                if self.state is EngineState.LOADING
                else "the backend is stopping"
            )


def _model_handle(model: Any, tokenizer: Any, max_model_len: int | None) -> ModelHandle:
    eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    context = max_model_len or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ModelHandle(
        model=model,
        tokenizer=tokenizer,
        eos_ids=frozenset(int(i) for i in eos_ids),
        max_model_len=context,
        pad_id=int(pad),
        device=str(model.device),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        precision=getattr(model, "understudy_precision", Precision()),
    )
