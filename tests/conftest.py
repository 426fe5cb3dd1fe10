"""Fixtures shared by every test package: offline environment, temp data dir, tiny model."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.app import UnderstudyApp, create_app
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.limits.clock import Clock
from gateway.settings import Settings, load_settings
from trainer.offline import enforce_offline

# Set before any test module imports transformers or litellm: nothing may reach the network.
enforce_offline()

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a ChatML tokenizer, saved as a local model folder."""
    from local_backend.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where dense copies of GGUF models are cached; shared across the session so the bundled
    SmolLM2 is converted once per test run."""
    shared = os.environ.get("UNDERSTUDY_TEST_MODEL_CACHE")
    yield Path(shared) if shared else tmp_path_factory.mktemp("model-cache")


# --- gateway fixtures: a real fake cloud and a real gateway, each on a loopback socket -------


@pytest.fixture
def fake_cloud() -> Iterator[FakeCloudServer]:
    server = FakeCloudServer(FakeCloud()).start()
    yield server
    server.stop()


@dataclass
class RunningGateway:
    app: UnderstudyApp
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> Settings:
        return self.app.settings

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_backend_healthy(self, timeout: float = 300.0) -> None:
        """Wait until the supervised local backend answers (it loads its model at start)."""
        backend = self.app.services.backend
        assert backend is not None, "no local backend configured"
        deadline = time.monotonic() + timeout
        while not backend.healthy.is_set():  # an asyncio.Event of the gateway's loop: poll it
            assert time.monotonic() < deadline, "local backend never became healthy"
            time.sleep(0.2)

    def wait_for_records(self, count: int, timeout: float = 10.0, **where: Any) -> list[dict[str, Any]]:
        from gateway.store.base import RecordFilter

        deadline = time.monotonic() + timeout
        store = self.app.services.store
        while True:
            rows = store.list_records(RecordFilter(**where), limit=100_000)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


def start_gateway(settings: Settings, clock: Clock | None = None) -> RunningGateway:
    app = create_app(settings, clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.01)
    return RunningGateway(app, server, thread, sock.getsockname()[1])


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def gateway_factory(data_dir: Path, fake_cloud: FakeCloudServer) -> Iterator[GatewayFactory]:
    """Start gateways on free ports, pointed at the fake cloud, local backend off by default."""
    running: list[RunningGateway] = []

    def factory(clock: Clock | None = None, **overrides: Any) -> RunningGateway:
        base: dict[str, Any] = {
            "data_dir": data_dir,
            "upstream": {"base_url": fake_cloud.base_url},
            "local": {"enabled": False},
        }
        # An explicit (empty) config file: the repo's own gateway.yaml must not leak into tests.
        config = data_dir.parent / "gateway.yaml"
        config.write_text("{}\n")
        settings = load_settings(config, environ={}, **{**base, **overrides})
        gateway = start_gateway(settings, clock)
        running.append(gateway)
        return gateway

    yield factory
    for gateway in running:
        with contextlib.suppress(Exception):
            gateway.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> RunningGateway:
    return gateway_factory()


@pytest.fixture
def client(gateway: RunningGateway) -> Any:
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-secret-123", max_retries=0)


# --- a real redis-server for the shared-state tests (skipped only when it is not installed) --


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import shutil
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's redis-server, emptied for this test."""
    import redis

    with redis.Redis.from_url(redis_server) as connection:
        connection.flushall()
    return redis_server


# --- a real PostgreSQL for the shared-store tests (skipped only when it is not installed) ---


def _postgres_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found or (candidates[-1] if candidates else None)


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster that a test may stop and start again (a database outage)."""

    url: str
    pg_ctl: str
    directory: Path
    options: str
    as_user: list[str]

    def _ctl(self, *args: str) -> None:
        quiet = subprocess.DEVNULL
        command = [*self.as_user, self.pg_ctl, "-D", str(self.directory / "data"), *args]
        subprocess.run(command, check=True, stdout=quiet, stderr=quiet)

    def start(self) -> None:
        self._ctl("-o", self.options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway cluster (initdb in a temp dir, trust auth on loopback, a free port); the
    server refuses to run as root, so as root it runs as the `postgres` user."""
    import pwd
    import shutil
    import tempfile

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    as_user: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="understudy-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        account = pwd.getpwnam("postgres")
        os.chown(workdir, account.pw_uid, account.pw_gid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    init = [*as_user, initdb, "-D", str(workdir / "data"), "-U", "postgres", "--auth=trust"]
    subprocess.run(init, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    cluster = PostgresCluster(url, pg_ctl, workdir, options, as_user)
    cluster.start()
    yield cluster
    with contextlib.suppress(subprocess.CalledProcessError):  # a test may have left it stopped
        cluster.stop("immediate")
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.url


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL, for this test."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # a generated name
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"
