"""Config: YAML + ${VAR} interpolation + env overrides, unknown keys refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads_with_defaults() -> None:
    settings = load_settings(REPO / "gateway.yaml", environ={})
    assert settings.port == 8000
    assert settings.upstream.base_url == "https://api.openai.com/v1"
    assert settings.upstream.api_key is None
    assert settings.admin_key is None
    assert [r.name for r in settings.all_routes()] == ["default"]


def test_interpolation_and_env_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "upstream:\n  base_url: ${BASE:-http://x/v1}\n  api_key: ${KEY}\nroutes:\n"
        "  - name: r1\n    match: ['m-*']\n    policy: {min_samples: 5}\n",
    )
    settings = load_settings(path, environ={"KEY": "sk-abc"})
    assert settings.upstream.base_url == "http://x/v1"
    assert settings.upstream.api_key == "sk-abc"
    assert settings.routes[0].policy.min_samples == 5
    env = {"UNDERSTUDY_PORT": "9001", "UNDERSTUDY_UPSTREAM_BASE_URL": "http://y/v1", "OPENAI_API_KEY": "sk-o"}
    settings = load_settings(path, environ=env)
    assert settings.port == 9001
    assert settings.upstream.base_url == "http://y/v1"
    assert settings.upstream.api_key == "sk-o"
    env["UNDERSTUDY_UPSTREAM_API_KEY"] = "sk-u"
    assert load_settings(path, environ=env).upstream.api_key == "sk-u"
    assert load_settings(path, environ={"UNDERSTUDY_LOCAL": "off"}).local.enabled is False


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routes\.0\.policy\.min_sampels: unknown key"):
        load_settings(write(tmp_path, "routes:\n  - name: a\n    policy: {min_sampels: 3}\n"), environ={})


def test_bad_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(write(tmp_path, "port: lots\n"), environ={})
    with pytest.raises(ConfigError, match="unknown upstream 'nope'"):
        load_settings(write(tmp_path, "routes:\n  - name: a\n    upstream: nope\n"), environ={})
    with pytest.raises(ConfigError, match="duplicate route names: a"):
        load_settings(write(tmp_path, "routes:\n  - name: a\n  - name: a\n"), environ={})
    with pytest.raises(ConfigError, match=r"routes\.0\.name"):
        load_settings(write(tmp_path, "routes:\n  - name: ../etc\n"), environ={})
    with pytest.raises(ConfigError, match="UNDERSTUDY_LOCAL"):
        load_settings(write(tmp_path, "{}"), environ={"UNDERSTUDY_LOCAL": "maybe"})


def test_bad_config_stops_start_up_with_one_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  base_ulr: http://x\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "upstream.base_ulr: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_replica_settings_from_the_environment(tmp_path: Path) -> None:
    """What deploy/compose.yaml sets: a shared adapters volume and one external backend."""
    env = {"UNDERSTUDY_ADAPTERS_DIR": "/adapters", "UNDERSTUDY_LOCAL_BASE_URL": "http://backend:7000/v1"}
    settings = load_settings(write(tmp_path, "{}"), environ=env)
    assert settings.adapters_root == Path("/adapters")
    assert settings.local_base_url == "http://backend:7000/v1" and not settings.manages_local_backend
    default = load_settings(write(tmp_path, "data_dir: some/where\n"), environ={})
    assert default.adapters_root == (Path("some/where") / "adapters").absolute()
