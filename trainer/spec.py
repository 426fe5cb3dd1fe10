"""`TrainSpec`: what to train on and how. One typed object shared by the CLI (which derives its
flags from the fields), the job manager (which turns a spec back into those flags) and the
training code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from local_backend.loading import DEFAULT_MODEL

ALL_LINEAR: Literal["all-linear"] = "all-linear"
MIN_EPOCHS, MAX_EPOCHS = 1, 10
# Fields that say where and on what it runs, not how to train: left out of the recorded hyperparameters.
_LOCATION_FIELDS = frozenset({"data", "model_cache", "device", "threads"})


class TrainSpec(BaseModel):
    """A training job's inputs. Defaults suit a 135M-1.1B Llama with LoRA on CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path | None = Field(None, description="JSONL of log records or {'messages': [...]} chats")
    base_model: str = Field(DEFAULT_MODEL, description="bundled model name, local folder or GGUF file")
    init_adapter: Path | None = Field(None, description="continue from this peft adapter folder")
    model_cache: Path | None = Field(None, description="where GGUF models are converted (default DATA_DIR)")
    lora_r: int = Field(16, ge=1, le=512, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ALL_LINEAR, description="'all-linear' or comma-separated module names (q_proj,v_proj)"
    )
    epochs: int | None = Field(None, ge=1, description="default: round(10000 / samples) clamped 1..10")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    max_length: int = Field(1024, ge=16, description="tokens per example; longer ones are cut")
    batch_size: int = Field(4, ge=1, description="examples per device step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    learning_rate: float = Field(2e-4, gt=0.0, description="peak learning rate")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="fraction of steps for LR warm-up")
    lr_scheduler: str = Field("linear", description="transformers scheduler name")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="held-out share, split by prompt hash")
    eval_each_epoch: bool = Field(False, description="eval loss after every epoch, not only at the end")
    group_by_length: bool = Field(True, description="batch similar lengths together (less padding)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (large models)")
    seed: int = Field(42, description="seed for LoRA init, shuffling and dropout")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; default CUDA when present")
    threads: int | None = Field(None, ge=1, description="CPU threads; default all cores but one")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str) and value != ALL_LINEAR:
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that shape the adapter, JSON-ready, for meta.json."""
        return self.model_dump(mode="json", exclude=set(_LOCATION_FIELDS))

    def to_argv(self) -> list[str]:
        """CLI flags reproducing this spec (only fields that differ from the defaults)."""
        argv: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value == field.default:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                argv += [flag, ",".join(value)]
            elif value is not None:
                argv += [flag, str(value)]
        return argv


def epochs_for(sample_count: int) -> int:
    """OpenPipe's rule of thumb: about 10000 examples seen in total, 1 to 10 epochs."""
    if sample_count <= 0:
        return MAX_EPOCHS
    return max(MIN_EPOCHS, min(MAX_EPOCHS, round(10_000 / sample_count)))


def default_threads() -> int:
    """All usable cores but one: a job shares the machine with the gateway and the local
    backend, and when torch's threads outnumber the free cores its OpenMP workers spin against
    each other (measured on 2 shared cores: 8x the CPU time per step at 2 threads vs 1)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable - 1)
