"""The gateway-only install: what needs which extra, and `understudy serve` without them.

The CLI runs in a subprocess whose heavy modules are blocked (`sys.modules[name] = None` makes
them unfindable and unimportable), so these tests read the same on a full and a slim install.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway import extras
from gateway.demo.fakecloud import FakeCloudServer
from gateway.errors import ConfigError
from gateway.settings import Settings

HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "gguf", "outlines", "outlines_core")


def nothing_extra(module: str) -> bool:
    return module not in HEAVY


def test_built_in_default_turns_the_local_model_off_without_the_extra() -> None:
    settings = Settings()
    fitted = extras.fit_to_install(settings, nothing_extra)
    assert settings.local.enabled
    assert not fitted.local.enabled
    assert fitted.upstream == settings.upstream


def test_explicit_local_enabled_fails_with_one_line_naming_the_extra() -> None:
    settings = Settings.model_validate({"local": {"enabled": True}})
    with pytest.raises(ConfigError) as caught:
        extras.fit_to_install(settings, nothing_extra)
    message = str(caught.value)
    assert message.startswith("local.enabled needs the local extra: pip install 'understudy[local]'")
    assert "UNDERSTUDY_LOCAL=off" in message
    assert "\n" not in message


def test_adapting_route_needs_the_trainer() -> None:
    settings = Settings.model_validate({"routes": [{"name": "r", "match": ["m"], "adapt": True}]})
    with pytest.raises(ConfigError, match=r"route 'r' \(adapt: true\) needs the train extra"):
        extras.fit_to_install(settings, nothing_extra)
    trainer_only = extras.EXTRA_MODULES["train"]
    with pytest.raises(ConfigError, match=r"^local.enabled needs the local extra"):
        extras.fit_to_install(settings, lambda module: module in trainer_only)


def test_external_local_server_needs_no_local_extra() -> None:
    settings = Settings.model_validate({"local": {"enabled": True, "base_url": "http://vllm:8001/v1"}})
    assert extras.fit_to_install(settings, nothing_extra) is settings


def test_everything_installed_changes_nothing() -> None:
    settings = Settings.model_validate({"routes": [{"name": "r", "adapt": True}]})
    assert extras.fit_to_install(settings, lambda module: True) is settings


def test_missing_lists_the_absent_modules() -> None:
    assert extras.missing("train", lambda module: module != "datasets") == ["datasets"]
    assert extras.missing("demo", lambda module: True) == []


# --- the real CLI, with the heavy modules blocked ------------------------------------------


def cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({HEAVY!r}))\n"
        "from gateway.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("UNDERSTUDY_CONFIG", None)
    env.pop("UNDERSTUDY_LOCAL", None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("config", "needs"),
    [
        ("local: {enabled: true}\n", "local.enabled needs the local extra"),
        ("routes: [{name: r, match: [m], adapt: true}]\n", "route 'r' (adapt: true) needs the train extra"),
    ],
)
def test_serve_refuses_a_config_that_needs_an_extra(tmp_path: Path, config: str, needs: str) -> None:
    (tmp_path / "gateway.yaml").write_text(config)
    process = cli(["serve", "--port", str(free_port())], tmp_path)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith(f"understudy: {needs}: pip install 'understudy[")


@pytest.mark.parametrize("verb", ["backend", "train", "demo"])
def test_verbs_name_their_extra(tmp_path: Path, verb: str) -> None:
    process = cli([verb], tmp_path)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.startswith(f"understudy: understudy {verb} needs the ")
    assert "Traceback" not in stderr


def wait_ready(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway did not become ready (exit {process.poll()})")


def test_bare_serve_is_a_proxy_without_the_local_extra(tmp_path: Path, fake_cloud: FakeCloudServer) -> None:
    (tmp_path / "gateway.yaml").write_text(f"upstream: {{base_url: '{fake_cloud.base_url}'}}\n")
    port = free_port()
    process = cli(["serve", "--port", str(port)], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        answer: Any = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "echo: hi"
        assert "local_backend" not in httpx.get(url + "/readyz", timeout=5).json()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert "local model off: this is a gateway-only install (pip install 'understudy[local]'" in stderr


def test_starting_the_gateway_imports_no_model_library(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from gateway.cli import server_config\n"
        "from gateway.settings import Settings\n"
        "server_config(Settings.model_validate({'data_dir': sys.argv[1], 'routes': "
        "[{'name': 'r', 'adapt': True}]}))\n"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
