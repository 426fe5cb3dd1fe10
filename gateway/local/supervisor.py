"""Runs the local backend as a child process: start, wait for health, restart on a crash.

The gateway serves from the cloud from its first second; the local model becomes available
when the backend reports healthy (a first start converts the bundled GGUF, ~15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import aiohttp

from gateway.settings import Settings

log = logging.getLogger("understudy.local")

_MAX_BACKOFF_S = 60.0


class BackendSupervisor:
    def __init__(
        self,
        settings: Settings,
        on_spawn: Callable[[], None] | None = None,
        on_healthy: Callable[[], None] | None = None,
    ):
        self.settings = settings
        # Called each time a fresh backend process starts (it has no adapters loaded yet),
        # and each time one first answers its health check.
        self.on_spawn = on_spawn or (lambda: None)
        self.on_healthy = on_healthy or (lambda: None)
        self.process: asyncio.subprocess.Process | None = None
        self.healthy = asyncio.Event()
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def command(self) -> list[str]:
        local = self.settings.local
        return [
            sys.executable,
            "-m",
            "local_backend",
            "--model",
            local.model,
            "--host",
            local.host,
            "--port",
            str(local.port),
            "--data-dir",
            str(self.settings.data_dir),
            "--threads",
            str(local.threads or max(1, (os.cpu_count() or 2) // 2)),
            "--dtype",
            local.dtype,
            "--quantize",
            local.quantize,
        ]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="local-backend-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()

    def status(self) -> dict[str, object]:
        return {
            "managed": True,
            "pid": self.process.pid if self.process else None,
            "healthy": self.healthy.is_set(),
            "restarts": self.restarts,
            "base_url": self.settings.local_base_url,
        }

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            log_path = self.settings.data_dir / "local-backend.log"
            sink = await asyncio.to_thread(open, log_path, "ab")
            try:
                self.process = await asyncio.create_subprocess_exec(*self.command, stdout=sink, stderr=sink)
            finally:
                sink.close()  # the child holds its own copy of the descriptor
            log.info("local backend starting (pid %d, log %s)", self.process.pid, log_path)
            self.on_spawn()
            health = asyncio.create_task(self._wait_healthy())
            code = await self.process.wait()
            health.cancel()
            self.healthy.clear()
            if self._stopping:
                return
            self.restarts += 1
            backoff = 1.0 if time.monotonic() - started > _MAX_BACKOFF_S else min(backoff * 2, _MAX_BACKOFF_S)
            log.error("local backend exited with %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)

    async def _wait_healthy(self) -> None:
        url = self.settings.local_base_url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + self.settings.local.startup_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            self.healthy.set()
                            log.info("local backend healthy at %s", self.settings.local_base_url)
                            self.on_healthy()
                            return
                await asyncio.sleep(0.5)
        log.error("local backend not healthy after %.0f s", self.settings.local.startup_timeout_s)

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()
