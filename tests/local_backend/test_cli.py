"""The CLI's option mapping and exit codes, and the app factory's readiness contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from local_backend.cli import build_parser, main, settings_from_args
from local_backend.server import create_app
from local_backend.settings import Settings
from tests.local_backend.support import REPO, free_port


def test_options_map_onto_settings(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["--model", "m", "--port", "7100", "--lora", "a=/x/a", "--lora", "b = /x/b ", "--max-queue", "3",
         "--max-batch-size", "2", "--device", "cpu", "--data-dir", str(tmp_path)]
    )  # fmt: skip
    settings = settings_from_args(args, parser)
    assert settings.model == "m" and settings.port == 7100 and settings.device == "cpu"
    assert settings.loras == {"a": Path("/x/a"), "b": Path("/x/b")}
    assert (settings.max_queue, settings.max_batch_size, settings.data_dir) == (3, 2, tmp_path)
    assert settings.model_name == "m"


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    parser = build_parser()
    monkeypatch.delenv("UNDERSTUDY_DATA_DIR", raising=False)
    settings = settings_from_args(parser.parse_args([]), parser)
    assert (settings.model, settings.host, settings.port) == ("SmolLM2-135M-Instruct", "127.0.0.1", 7000)
    assert settings.data_dir == Path(".understudy")
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path))
    assert settings_from_args(parser.parse_args([]), parser).data_dir == tmp_path


@pytest.mark.parametrize("argv", [["--lora", "no-equals-sign"], ["--max-queue", "0"], ["--port", "x"]])
def test_bad_options_exit_with_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="max_qeue"):
        Settings.model_validate({"max_qeue": 3})


async def test_app_answers_503_until_the_model_is_loaded() -> None:
    # No lifespan runs under ASGITransport: the model never loads, as in a server's first seconds.
    app = create_app(Settings(model="/nonexistent/model"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backend") as http:
        health = await http.get("/health")
        chat = await http.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        models = await http.get("/v1/models")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert (
        chat.status_code == 503
        and chat.headers["retry-after"]
        and chat.json()["error"]["code"] == "model_loading"
    )
    assert models.json() == {"object": "list", "data": []}


def test_a_model_that_cannot_load_exits_with_1(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "local_backend", "--model", str(tmp_path / "missing-model")]
    command += ["--port", str(free_port()), "--data-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "missing-model" in done.stderr
