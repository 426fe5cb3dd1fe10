"""`understudy demo`: watch a route learn, offline, on a laptop CPU in a few minutes.

A simulated cloud answers a narrow task (name/age/city extraction) exactly; the gateway logs
its answers, trains a LoRA adapter for the bundled SmolLM2, judges it (json_equal) and moves
the route to the local model; a traffic generator keeps requests flowing throughout.
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import openai
import orjson
import uvicorn

from gateway.app import UnderstudyApp, create_app
from gateway.demo import task
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import Settings

ROUTE = "extract"
CLOUD_MODEL = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_settings(data_dir: Path, cloud_url: str, port: int, min_samples: int) -> Settings:
    return Settings.model_validate(
        {
            "port": port,
            "data_dir": data_dir,
            "upstream": {"base_url": cloud_url},
            "local": {"enabled": True, "port": free_port()},
            "routes": [
                {
                    "name": ROUTE,
                    "match": [CLOUD_MODEL],
                    "adapt": True,
                    "policy": {
                        "min_samples": min_samples,
                        "promote_after": 5,
                        "min_pass_rate": 0.5,
                        "threshold": 100,
                        "min_rolling_score": 80,
                        "judge": "json_equal",
                        "eval_rate": 0.1,
                        "window": 30,
                        "demote_after": 6,
                        "cooldown_s": 0,
                    },
                }
            ],
        }
    )


@dataclass
class Traffic:
    """Counts of who answered, and how the local answers scored against the cloud's."""

    backends: Counter[str] = field(default_factory=Counter)
    local_correct: int = 0
    local_total: int = 0

    def share_local(self) -> float:
        total = sum(self.backends.values())
        return (self.backends["local"] + self.backends["failover"]) / total if total else 0.0


class GatewayThread:
    def __init__(self, app: UnderstudyApp, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


class Demo:
    def __init__(self, workdir: Path, out: TextIO, min_samples: int = 40):
        self.workdir = workdir
        self.out = out
        self.min_samples = min_samples
        self.traffic = Traffic()
        self.cloud = FakeCloudServer(FakeCloud(answer=task.cloud_answer, record=False))
        self.started = time.monotonic()

    def say(self, line: str) -> None:
        self.out.write(f"[{time.monotonic() - self.started:6.1f}s] {line}\n")
        self.out.flush()

    def run(self) -> Traffic:
        self.cloud.start()
        port = free_port()
        app = create_app(demo_settings(self.workdir, self.cloud.base_url, port, self.min_samples))
        gateway = GatewayThread(app, port)
        gateway.start()
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-demo", max_retries=0)
            self._wait_backend(app)
            self._learn(app, client)
            self._serve(client)
        finally:
            gateway.stop()
            self.cloud.stop()
        return self.traffic

    def _wait_backend(self, app: UnderstudyApp) -> None:
        self.say("starting the local backend (the first run converts the bundled SmolLM2, ~15 s)")
        backend = app.services.backend
        assert backend is not None
        while not backend.healthy.is_set():
            time.sleep(0.5)
        self.say(f"gateway up; route '{ROUTE}' learns '{CLOUD_MODEL}' traffic; the cloud answers for now")

    def _ask(self, client: openai.OpenAI, example: task.Example) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=CLOUD_MODEL,
            messages=example.messages(),  # type: ignore[arg-type]
            max_tokens=40,
            temperature=0,
        )
        backend = raw.headers["x-understudy-backend"]
        self.traffic.backends[backend] += 1
        if backend != "cloud":
            answer = raw.parse().choices[0].message.content or ""
            self.traffic.local_total += 1
            self.traffic.local_correct += same_json(answer, example.answer)
        return backend

    def _learn(self, app: UnderstudyApp, client: openai.OpenAI) -> None:
        controller = app.services.controller
        assert controller is not None
        stream = iter(task.examples(2000, seed=7))
        last_line = ""
        while (state := controller.describe(ROUTE))["mode"] != "local":
            if state["mode"] in ("cloud", "eval"):
                self._ask(client, next(stream))
            line = self._status(state)
            if line != last_line:
                self.say(line)
                last_line = line
            time.sleep(0.2 if state["mode"] == "cloud" else 1.0)
        self.say(f"promoted: {state['history'][-1]['reason']}")

    def _status(self, state: dict[str, Any]) -> str:
        mode = state["mode"]
        if mode == "training" and state.get("job"):
            job = state["job"]
            loss = f", loss {job['loss']:.3f}" if job.get("loss") is not None else ""
            return (
                f"training adapter: step {job.get('current_step') or 0}/{job.get('total_steps') or '?'}{loss}"
            )
        if mode == "eval":
            rate = state.get("pass_rate")
            shown = "-" if rate is None else f"{rate:.0%}"
            return f"evaluating adapter v{state['candidate_adapter']}: {state['window']} judged, pass rate {shown}"
        cloud = self.traffic.backends["cloud"]
        return f"collecting: {cloud} cloud answers logged (training starts at {self.min_samples})"

    def _serve(self, client: openai.OpenAI) -> None:
        before = Counter(self.traffic.backends)
        for example in task.examples(30, seed=99):  # prompts the model never trained on
            self._ask(client, example)
        served = self.traffic.backends - before
        self.say(f"next 30 requests: {served['local']} answered locally, {served['cloud']} by the cloud")


def same_json(answer: str, expected: str) -> bool:
    try:
        return bool(orjson.loads(answer) == orjson.loads(expected))
    except orjson.JSONDecodeError:
        return False


def run_demo(data_root: Path, keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the showcase under `data_root/demo-*` (sharing the converted model cache)."""
    workdir = data_root / f"demo-{int(time.time())}"
    (data_root / "models").mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True)
    (workdir / "models").symlink_to((data_root / "models").resolve())
    try:
        traffic = Demo(workdir, out).run()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = sum(traffic.backends.values())
    quality = traffic.local_correct / traffic.local_total if traffic.local_total else 0.0
    out.write(
        f"\n{total} requests: {traffic.backends['cloud']} cloud, {traffic.backends['local']} local; "
        f"local share {traffic.share_local():.0%}; local answers correct on unseen prompts: "
        f"{traffic.local_correct}/{traffic.local_total} ({quality:.0%})\n"
    )
    return 0
