"""`understudy demo`: watch a route learn, offline, on a laptop CPU in a few minutes.

A simulated cloud answers a narrow task (name/age/city extraction) exactly; the gateway logs
its answers, trains a LoRA adapter for the bundled SmolLM2, judges it (json_equal) and moves
the route to the local model; a traffic generator keeps requests flowing throughout.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
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
from trainer.console import Progress

ROUTE = "extract"
CLOUD_MODEL = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_settings(
    data_dir: Path,
    cloud_url: str,
    port: int,
    min_samples: int,
    upstream_key: str | None = None,
    **policy: Any,
) -> Settings:
    """The demo's route (json_equal judge, promote after 5 passes); `policy` overrides its
    policy, `upstream_key` gives the gateway a key of its own (synthetic data needs one)."""
    upstream = {"base_url": cloud_url, **({"api_key": upstream_key} if upstream_key else {})}
    return Settings.model_validate(
        {
            "port": port,
            "data_dir": data_dir,
            "upstream": upstream,
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
                        **policy,
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


class PhaseBars:
    """On a terminal, a bar per phase of the cycle: answers collected, training steps, verdicts."""

    def __init__(self, min_samples: int):
        self.min_samples = min_samples
        self.mode = ""
        self.bar: Progress | None = None

    def show(self, state: dict[str, Any], cloud_answers: int) -> None:
        mode, job = state["mode"], state.get("job") or {}
        if mode != self.mode:
            self.close()
            self.mode = mode
            self.bar = self._open(mode, job)
        if self.bar is None:
            return
        if mode == "training":
            loss = f"loss {job['loss']:.3f}" if job.get("loss") is not None else ""
            self.bar.update(job.get("current_step") or 0, loss, job.get("total_steps"))
        elif mode == "eval":
            rate = state.get("pass_rate")
            self.bar.update(state["window"], "" if rate is None else f"pass rate {rate:.0%}")
        else:
            self.bar.update(min(cloud_answers, self.min_samples))

    def _open(self, mode: str, job: dict[str, Any]) -> Progress | None:
        if mode == "training":
            return Progress("training the adapter", job.get("total_steps"), "steps")
        if mode == "eval":
            return Progress("judging the adapter", None, "verdicts")
        if mode == "cloud":
            return Progress("collecting cloud answers", self.min_samples, "answers")
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
        self.say("starting the local backend")
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
        bars = PhaseBars(self.min_samples) if sys.stderr.isatty() else None
        while (state := controller.describe(ROUTE))["mode"] != "local":
            if state["mode"] in ("cloud", "eval"):
                self._ask(client, next(stream))
            line = self._status(state)
            if bars is not None:
                bars.show(state, self.traffic.backends["cloud"])
            elif line != last_line:
                self.say(line)
                last_line = line
            time.sleep(0.2 if state["mode"] == "cloud" else 1.0)
        if bars is not None:
            bars.close()
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


def convert_model(data_root: Path) -> None:
    """Convert the bundled SmolLM2 once, in a child process that draws its progress on this
    terminal (the backend's own output goes to its log) and gives its memory back."""
    code = (
        "import sys; from pathlib import Path; from trainer.offline import enforce_offline; "
        "enforce_offline(); from local_backend.loading import DEFAULT_MODEL, ensure_dense, resolve; "
        "ensure_dense(resolve(DEFAULT_MODEL), Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(data_root)], check=True)


def run_demo(data_root: Path, keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the showcase under `data_root/demo-*` (sharing the converted model cache)."""
    workdir = data_root / f"demo-{int(time.time())}"
    (data_root / "models").mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True)
    (workdir / "models").symlink_to((data_root / "models").resolve())
    convert_model(data_root)
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
