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
# Fields that say where and on what it runs, not how to train: left out of the recorded hyperparameters.
_LOCATION_FIELDS = frozenset(
    {"data", "store_url", "adapters_dir", "failed_data", "model_cache", "device", "threads"}
)


class TrainSpec(BaseModel):
    """A training job's inputs. Defaults suit a 135M-1.1B Llama with LoRA on CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path | None = Field(None, description="JSONL of log records or {'messages': [...]} chats")
    store_url: str | None = Field(
        None, description="the gateway's log store when no --data (default sqlite:///DATA_DIR/understudy.db)"
    )
    adapters_dir: Path | None = Field(
        None, description="where adapter versions go, ROUTE/vN (default DATA_DIR/adapters)"
    )
    base_model: str = Field(DEFAULT_MODEL, description="bundled model name, local folder or GGUF file")
    init_adapter: Path | None = Field(None, description="continue from this peft adapter folder")
    model_cache: Path | None = Field(None, description="where GGUF models are converted (default DATA_DIR)")
    lora_r: int = Field(16, ge=1, le=512, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ALL_LINEAR, description="'all-linear' or comma-separated module names (q_proj,v_proj)"
    )
    epochs: int | None = Field(None, ge=1, description="exactly this many epochs, instead of the budget")
    max_epochs: int = Field(3, ge=1, description="cap on epochs when the budget decides")
    max_examples_seen: int = Field(400, ge=1, description="budget of a first job, in examples seen")
    retrain_examples_seen: int = Field(
        200, ge=1, description="budget of a job continuing from init_adapter, in examples seen"
    )
    max_steps: int | None = Field(
        None, ge=1, description="exactly this many optimizer steps (overrides epochs and the budget)"
    )
    max_samples: int = Field(300, ge=1, description="training pairs at most: a deduplicated, diverse sample")
    replay_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="share of a retrain's pairs replayed from the previous adapter's"
    )
    failed_data: Path | None = Field(
        None, description="JSONL of pairs the candidate failed (chats, log records or eval rows)"
    )
    max_length: int = Field(1024, ge=16, description="tokens per example; longer ones are cut")
    batch_size: int = Field(4, ge=1, description="examples per device step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    learning_rate: float = Field(2e-4, gt=0.0, description="peak learning rate")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="fraction of steps for LR warm-up")
    lr_scheduler: str = Field("linear", description="transformers scheduler name")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="held-out share, split by prompt hash")
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of training pairs set aside for the loss that stops training"
    )
    # Each validation eval runs these pairs forward: 16 keep a retrain on a big log (the slice
    # is 10% of the pool) from spending more on evals than the first job spends training.
    max_validation_samples: int = Field(16, ge=1, description="validation pairs at most")
    eval_steps: int | None = Field(
        None, ge=1, description="validation loss every N steps (default: ~12 a job)"
    )
    early_stopping_patience: int = Field(
        3, ge=0, description="stop after N evals without improvement (0: never stop early)"
    )
    early_stopping_min_delta: float = Field(
        0.01, ge=0.0, description="a smaller fall of the validation loss counts as flat"
    )
    group_by_length: bool = Field(True, description="batch similar lengths together (less padding)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (large models)")
    seed: int = Field(42, description="seed for LoRA init, shuffling and dropout")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; default CUDA when present")
    threads: int | None = Field(None, ge=1, description="CPU threads; default every core")

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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(local_serving: bool = False) -> int:
    """CPU threads for a job: every usable core while nothing is served locally; half of them
    (at least one) while the local backend answers requests, so decoding keeps its cores.
    The gateway calls this when it starts a job; `training.threads` overrides it."""
    usable = usable_cores()
    return max(1, usable // 2) if local_serving else usable
