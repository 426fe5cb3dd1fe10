"""The gateway's control channel to the local model server: adapter loading and health.

The same calls vLLM serves (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`,
`/v1/models`), so an external vLLM with `--enable-lora` can stand in at scale. Generation
itself goes through the ordinary proxy path (an OpenAI-compatible upstream).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.errors import LocalBackendError

log = logging.getLogger("understudy.local")


def adapter_name(route: str, version: int) -> str:
    """The model name a route's adapter version is served under."""
    return f"{route}-v{version}"


class LocalBackendClient:
    def __init__(self, base_url: str, timeout_s: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.loaded: set[str] = set()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def forget_loaded(self) -> None:
        """The server restarted: nothing is loaded any more."""
        self.loaded.clear()

    async def healthy(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(self.root_url + "/health") as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        assert self._session is not None
        try:
            async with self._session.post(self.base_url + path, json=body) as response:
                return response.status, await response.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise LocalBackendError(f"local backend unreachable: {type(exc).__name__}") from None

    async def ensure_adapter(self, name: str, path: Path) -> None:
        """Load `name` from `path` unless this client already did since the last restart.
        Idempotent across replicas sharing one backend: a name already loaded (by another
        replica) is success. `path` must mean the same folder to the backend (settings'
        `adapters_root` is absolute; a shared volume is mounted at one path in both)."""
        async with self._lock:
            if name in self.loaded:
                return
            body = {"lora_name": name, "lora_path": str(path)}
            status, text = await self._post("/load_lora_adapter", body)
            # vLLM answers 400 "already loaded" for a name it has: that is success here.
            if status != 200 and "already" not in text.lower():
                raise LocalBackendError(f"loading adapter {name} failed ({status}): {text[:300]}")
            self.loaded.add(name)
            log.info("adapter %s loaded from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        async with self._lock:
            status, text = await self._post("/unload_lora_adapter", {"lora_name": name})
            self.loaded.discard(name)
            if status not in (200, 404):
                raise LocalBackendError(f"unloading adapter {name} failed ({status}): {text[:300]}")

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streamed chat completion (shadow evaluations use this)."""
        status, text = await self._post("/chat/completions", {**body, "stream": False})
        if status != 200:
            raise LocalBackendError(f"local answer failed ({status}): {text[:300]}")
        answer = orjson.loads(text)
        if not isinstance(answer, dict):
            raise LocalBackendError("local answer is not a JSON object")
        return answer

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        try:
            async with self._session.get(url) as response:
                return await response.json(content_type=None) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def context_length(self) -> int | None:
        """The base model's context in tokens (`max_model_len`, as vLLM reports it), if known."""
        models = await self._get_json(self.base_url + "/models")
        data = models.get("data") if isinstance(models, dict) else None
        for card in data if isinstance(data, list) else []:
            length = card.get("max_model_len") if isinstance(card, dict) else None
            if isinstance(length, int) and length > 0:
                return length
        return None

    async def self_test_error(self) -> str | None:
        """The backend's start-up LoRA self-test error, or None when it passed or the server
        does not report one (an external vLLM)."""
        health = await self._get_json(self.root_url + "/health")
        result = health.get("lora_selftest") if isinstance(health, dict) else None
        if isinstance(result, dict) and result.get("ok") is False:
            return str(result.get("error") or "the LoRA self-test failed")
        return None
