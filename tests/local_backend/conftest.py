"""Fixtures for the local backend: a lively tiny Llama, LoRA adapters for it, and real
backend servers started as subprocesses (`python -m local_backend`, like vLLM's
RemoteOpenAIServer) that tests talk to with the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.local_backend.support import RemoteBackend, make_lora


@pytest.fixture(scope="session")
def lively_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with weights drawn wide enough that greedy decoding does not collapse
    onto one token: varied (gibberish) text, partial UTF-8 included, and distinct outputs
    per prompt and per adapter, so tests can compare them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("lively") / "lively-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def lora_dirs(lively_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        name: make_lora(lively_model_dir, root / name, seed)
        for seed, name in enumerate(["alpha", "beta", "gamma"])
    }


@pytest.fixture(scope="session")
def backend_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for the tiny-model servers, so the JSON-object grammar is built once."""
    return tmp_path_factory.mktemp("backend-data")


@pytest.fixture(scope="session")
def backend(
    lively_model_dir: Path, lora_dirs: dict[str, Path], backend_data_dir: Path
) -> Iterator[RemoteBackend]:
    """The shared tiny-model server, started with adapter `alpha`."""
    server = RemoteBackend(
        lively_model_dir,
        backend_data_dir,
        "--served-model-name",
        "tiny",
        "--lora",
        f"alpha={lora_dirs['alpha']}",
        "--max-batch-size",
        "8",
        "--threads",
        "1",
        # Tests compare answers with `generate` on the fp32 model (auto is bf16 on some CPUs).
        "--dtype",
        "float32",
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(backend: RemoteBackend) -> openai.OpenAI:
    return backend.client()


@pytest.fixture(scope="session")
def tiny_reference(lively_model_dir: Path) -> tuple[Any, Any]:
    """The same model in this process, to compare the server's output with `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lively_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(lively_model_dir)
