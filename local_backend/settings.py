"""The backend's one settings object: the CLI maps its options onto it, `create_app` reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from local_backend.loading import DEFAULT_MODEL


class Settings(BaseModel):
    """Everything the local backend needs to start; unknown keys are rejected by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=7000, ge=0, le=65535)
    data_dir: Path = Path(".understudy")
    loras: dict[str, Path] = Field(default_factory=dict)
    max_queue: int = Field(default=64, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    # Requests that arrive within this window of the first one join its batch.
    batch_window_ms: float = Field(default=10.0, ge=0)
    device: str | None = None
    # Torch intra-op threads (None: torch's default, one per core). On a shared CPU, fewer
    # threads can be much faster: a parallel op waits for its slowest, descheduled thread.
    threads: int | None = Field(default=None, ge=1)
    # auto: bf16 on CUDA or on a CPU with native bf16 (AVX512-bf16, AMX), else fp32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # int8: weight-only int8 of the decoder's linear layers; int4: weight-only int4 per group of
    # every linear layer, the head included (CPU only); both torchao. Adapters keep their dtype.
    # auto: int4 on a CPU with native bf16 where torchao is installed, else none. The gateway
    # passes its local.quantize (default auto); run alone, the backend serves unquantized.
    quantize: Literal["auto", "none", "int8", "int4"] = "none"
    max_model_len: int | None = Field(default=None, ge=1)
    # None: a request without max_tokens may use the rest of the context (as vLLM does).
    default_max_tokens: int | None = Field(default=None, ge=1)
    log_level: str = "info"

    @model_validator(mode="after")
    def _int4_in_bf16(self) -> Settings:
        if self.quantize == "int4" and self.dtype == "float32":
            raise ValueError("--quantize int4 computes in bfloat16; use --dtype auto or bfloat16")
        return self

    @field_validator("loras")
    @classmethod
    def _adapter_names_not_blank(cls, loras: dict[str, Path]) -> dict[str, Path]:
        for name in loras:
            if not name.strip():
                raise ValueError("a LoRA adapter needs a non-empty name")
        return loras

    @property
    def model_name(self) -> str:
        """The name clients use for the base model (and `/v1/models` lists)."""
        return self.served_model_name or self.model

    @property
    def model_cache_root(self) -> Path:
        """Where dense copies of GGUF models are cached (`<root>/models/<name>`)."""
        return self.data_dir

    @property
    def outlines_cache_dir(self) -> Path:
        return self.data_dir / "cache" / "outlines"
