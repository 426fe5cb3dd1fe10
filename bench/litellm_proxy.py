"""LiteLLM's proxy as a benchmark target, in its own venv (bench/.litellm-venv).

The venv is created on first use (`python3 -m venv`, then `pip install -r
bench/litellm-requirements.txt`, the pinned `litellm[proxy]`). The proxy runs with its CLI,
one worker, a master key but no database, its default logging and callbacks, and a config that points
`gpt-4o-mini` at the fake upstream. It must not need the network at run time: the price map is
the bundled one (`LITELLM_LOCAL_MODEL_COST_MAP=True`); 1.106 sends no telemetry (its
`--telemetry` flag is a deprecated no-op).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import REPO, Service, Services

VENV = REPO / "bench" / ".litellm-venv"
REQUIREMENTS = REPO / "bench" / "litellm-requirements.txt"
BIN = VENV / "bin"

ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "NO_PROXY": "127.0.0.1,localhost",
}


def ensure_venv(log: Path) -> str:
    """Create the venv unless it holds a working litellm; return litellm's version."""
    version = installed_version()
    if version:
        return version
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        if not (BIN / "python").exists():
            subprocess.run(["python3", "-m", "venv", str(VENV)], check=True, stdout=out, stderr=out)
        pip = [str(BIN / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, stdout=out, stderr=out)
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True, stdout=out, stderr=out, timeout=1200)
    version = installed_version()
    if not version:
        raise RuntimeError(f"litellm did not install into {VENV}; see {log}")
    return version


def installed_version() -> str | None:
    if not (BIN / "python").exists():
        return None
    probe = subprocess.run(
        [str(BIN / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() or None if probe.returncode == 0 else None


def config_text(upstream_base_url: str, master_key: str, database_url: str | None = None) -> str:
    # 1.106 refuses to start without a master key; with one and no database, it checks the key
    # in memory, as a production proxy without a database does.
    database = f"  database_url: {database_url}\n" if database_url else ""
    return (
        "model_list:\n"
        "  - model_name: gpt-4o-mini\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        f"      api_base: {upstream_base_url}\n"
        "      api_key: sk-fake-upstream\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n" + database
    )


def start(
    services: Services,
    workdir: Path,
    upstream_base_url: str,
    port: int,
    master_key: str,
    database_url: str | None = None,
    timeout: float = 180,
) -> Service:
    """The proxy, ready; with `database_url`, on that PostgreSQL (it then needs prisma)."""
    config = workdir / "litellm.yaml"
    config.write_text(config_text(upstream_base_url, master_key, database_url))
    env = {key: value for key, value in os.environ.items() if not key.startswith("UNDERSTUDY_")}
    env.update(ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # No proxy database but the one asked for, whatever the caller's environment says.
    for key in ("VIRTUAL_ENV", "DATABASE_URL", "REDIS_HOST", "REDIS_URL"):
        env.pop(key, None)
    if database_url:
        env["DATABASE_URL"] = database_url
    command = [str(BIN / "litellm"), "--config", str(config), "--port", str(port), "--num_workers", "1"]
    command += ["--host", "127.0.0.1"]
    service = services.start("litellm", command, workdir / "litellm.log", env=env, cwd=workdir)
    service.wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=timeout)
    return service


if __name__ == "__main__":
    print(ensure_venv(REPO / "bench" / "results" / "litellm-install.log"), file=sys.stdout)
