"""Helpers for the local backend tests: a backend server in a child process (like vLLM's
RemoteOpenAIServer), random LoRA adapters, and a torch thread-count guard."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteBackend:
    """A backend server in a child process, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, model: str | Path, data_dir: Path, *extra: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "local_backend", "--model", str(model), "--port", str(self.port)]
        args += ["--data-dir", str(data_dir), "--log-level", "warning", *extra]
        self.log = log or data_dir / f"backend-{self.port}.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> RemoteBackend:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"backend exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"backend not ready after {timeout} s:\n{self.log.read_text()}")

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=60, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        """Current value of one sample of /metrics (0 when absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def make_lora(base_dir: Path, target: Path, seed: int) -> Path:
    """A LoRA adapter for `base_dir` with random (non-zero) weights: it visibly changes output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(target))
    return target


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch threads (tiny ops are fastest on one), then restore."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
