"""Security (issue 8): path traversal, SSRF and secrets, each against a real gateway on a
loopback socket (and, for secrets, `understudy serve` as a subprocess).

- Path traversal: route names, job ids, adapter versions and static paths that try to step
  outside are refused with a 4xx, and no file outside the data dir (or the static folder) is
  opened, listed, written or removed meanwhile (Python's audit hooks see every such call).
  The local backend takes any adapter folder it is told to, as vLLM does (it listens on
  loopback and its caller is the gateway): the gateway only ever tells it the registry's own
  `DATA_DIR/adapters/ROUTE/vN`, never a client's string; and it reads only JSON bodies, so a
  web page cannot make a browser post it a load request.
- SSRF: a client never chooses where the gateway connects: body fields litellm would honour
  (`api_base`, `base_url`, `custom_llm_provider`, ...), headers, absolute-form targets, path
  tricks and URL-like model names, on the OpenAI-compatible upstream and a litellm one. An
  "evil" loopback listener must see zero connections.
- Secrets: distinct planted secrets (upstream keys via `${VAR}`, client key, admin key, a
  redis password, a password in an upstream URL) appear in no answer, header, log line,
  metric, export or database file, through successes, streams and every kind of error.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from tests.conftest import GatewayFactory, RunningGateway
from tests.reliability import raw_http

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "gateway" / "static"
CHAT = "/v1/chat/completions"
JSON = (b"Content-Type", b"application/json")
HELLO = [{"role": "user", "content": "hello"}]


def is_openai_error(reply: raw_http.Reply) -> bool:
    try:
        error = reply.json()["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Evil:
    """A loopback listener standing for a host a client would like the gateway to call."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def evil() -> Iterator[Evil]:
    server = Evil()
    yield server
    server.close()


@pytest.fixture
def fake_local() -> Iterator[FakeCloudServer]:
    """The local backend: the fake cloud answers /v1/load_lora_adapter (its catch-all) and chat."""
    server = FakeCloudServer(FakeCloud()).start()
    yield server
    server.stop()


def plant_adapter(data_dir: Path, route: str, version: int) -> Path:
    folder = data_dir / "adapters" / route / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "meta.json").write_text(json.dumps({"base_model": "tiny", "version": version}))
    return folder


def adaptive_gateway(
    gateway_factory: GatewayFactory, fake_local: FakeCloudServer, **overrides: Any
) -> RunningGateway:
    policy = {"min_samples": 10**6, "judge": "exact", "eval_rate": 1.0}
    route = {"name": "support", "match": ["support-*"], "adapt": True, "policy": policy}
    return gateway_factory(
        local={"enabled": True, "base_url": fake_local.base_url}, routes=[route], **overrides
    )


# --- file access, seen through Python's audit hooks ------------------------------------------

_FILE_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "os.mkdir",
        "os.rename",
        "os.replace",
        "os.remove",
        "os.rmdir",
        "os.symlink",
        "os.link",
        "os.truncate",
        "os.chmod",
        "os.utime",
        "shutil.rmtree",
        "shutil.copyfile",
        "shutil.move",
    }
)
_touched: list[tuple[str, str]] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if (
        _touched is not None
        and event in _FILE_EVENTS
        and args
        and isinstance(args[0], str | bytes | os.PathLike)
    ):
        _touched.append((event, os.path.abspath(os.fsdecode(args[0]))))


@contextmanager
def files_touched() -> Iterator[list[tuple[str, str]]]:
    """Every path opened, listed, created, moved or removed by this process meanwhile."""
    global _touched, _hooked
    if not _hooked:  # an audit hook cannot be removed: one, switched on and off
        sys.addaudithook(_audit)
        _hooked = True
    found: list[tuple[str, str]] = []
    _touched = found
    try:
        yield found
    finally:
        _touched = None


def outside(paths: list[tuple[str, str]], *allowed: Path) -> list[tuple[str, str]]:
    """The touched paths under none of `allowed` (nor where Python and its libraries live)."""
    roots = [str(root.resolve()) for root in allowed]
    roots += [sys.prefix, sys.base_prefix, "/proc/", "/sys/", "/dev/"]
    return [(event, path) for event, path in paths if not any(path.startswith(root) for root in roots)]


# --- path traversal ----------------------------------------------------------------------------

TRAVERSING_NAMES = [
    "..",
    "../..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fetc",
    "..%2f..%2f..%2fetc",
    "support%2f..%2f..%2f..",
    "support/../../..",
    "support/..",
    "./support",
    "support%00",
    "%00",
    "..%00",
    "%252e%252e",
    "..%5c..%5cetc",
    "....%2f%2f....%2f%2fetc",
    "sup%0d%0aX-Injected:%201",
    "%EF%BD%93upport",  # a full-width s
    "%2Fetc%2Fpasswd",
    "~",
    "support;..",
]
ROUTE_ENDPOINTS = [
    ("GET", "/admin/routes/{}", b""),
    ("GET", "/admin/routes/{}/adapters", b""),
    ("POST", "/admin/routes/{}/adapter", b'{"version": 1}'),
    ("POST", "/admin/routes/{}/mode", b'{"mode": "cloud"}'),
    ("POST", "/admin/routes/{}/train", b""),
    ("POST", "/admin/routes/{}/eval", b""),
    ("GET", "/admin/jobs/{}", b""),
]
BAD_VERSIONS: list[Any] = [
    "../../etc",
    "1/../../x",
    "v1",
    "1",
    "0x1",
    -1,
    0,
    1.5,
    10**12,
    None,
    True,
    [1],
    {"$gt": 0},
]
STATIC_ESCAPES = [
    "../../settings.py",
    "..%2f..%2fsettings.py",
    "%2e%2e/%2e%2e/settings.py",
    "%2e%2e%2f%2e%2e%2fsettings.py",
    "....//....//settings.py",
    "..\\..\\settings.py",
    "%252e%252e/settings.py",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "app.css%00.py",
    "../../../../../../etc/passwd",
]


def test_traversal_is_refused_and_touches_nothing_outside(
    gateway_factory: GatewayFactory, fake_local: FakeCloudServer, data_dir: Path, tmp_path: Path
) -> None:
    secret_dir = tmp_path / "outside"
    plant_adapter(secret_dir, "support", 1)
    (secret_dir / "secret.txt").write_text("TOP SECRET")
    served = plant_adapter(data_dir, "support", 1)
    gateway = adaptive_gateway(gateway_factory, fake_local)
    port = gateway.port
    # Warm up every path once, so lazy imports are not counted as file access below (with
    # no such route: nothing starts, trains or loads).
    for method, template, body in ROUTE_ENDPOINTS:
        raw_http.request(port, method, template.format("nope"), [JSON], body)
    raw_http.request(port, "POST", "/admin/routes/support/adapter", [JSON], b'{"version": "1"}')
    raw_http.request(port, "GET", "/admin/routes/support/adapters")
    raw_http.request(port, "GET", "/ui/assets/app.css")

    replies: list[tuple[str, raw_http.Reply | None]] = []
    with files_touched() as touched:
        for name in TRAVERSING_NAMES:
            for method, template, body in ROUTE_ENDPOINTS:
                target = template.format(name)
                replies.append((target, raw_http.request(port, method, target, [JSON], body)))
        for version in BAD_VERSIONS:
            body = orjson.dumps({"version": version})
            reply = raw_http.request(port, "POST", "/admin/routes/support/adapter", [JSON], body)
            assert reply is not None and reply.status == 422, (version, reply)
            replies.append((f"version {version!r}", reply))
        missing = raw_http.request(port, "POST", "/admin/routes/support/adapter", [JSON], b'{"version": 2}')
        assert missing is not None and missing.status == 404
        for escape in STATIC_ESCAPES:
            target = "/ui/assets/" + escape
            replies.append((target, raw_http.request(port, "GET", target)))
        for name in TRAVERSING_NAMES:
            export = raw_http.request(port, "GET", f"/admin/logs/export?route={name}")
            assert export is not None and export.status == 200 and export.body == b""
            disposition = export.header("content-disposition") or ""
            assert disposition.startswith('attachment; filename="understudy-') and disposition.count('"') == 2
            assert all(c.isalnum() or c in '._-; ="' for c in disposition), disposition
            deleted = raw_http.request(port, "DELETE", f"/admin/logs?route={name}")
            assert deleted is not None and deleted.status == 200 and deleted.json()["deleted"] == 0
    for target, reply in replies:
        assert reply is not None and 400 <= reply.status < 500, (target, reply)
        assert is_openai_error(reply), (target, reply)
        assert (
            b"TOP SECRET" not in reply.body
            and b"root:" not in reply.body
            and b"class Settings" not in reply.body
        )
    assert outside(touched, data_dir, STATIC) == []
    assert any(path.startswith(str(data_dir.resolve())) for _, path in touched)  # the hook sees
    assert len(replies) == len(TRAVERSING_NAMES) * len(ROUTE_ENDPOINTS) + len(BAD_VERSIONS) + len(
        STATIC_ESCAPES
    )

    # The one legitimate load: the registry's own folder, whatever the client sent.
    ok = raw_http.request(port, "POST", "/admin/routes/support/adapter", [JSON], b'{"version": 1}')
    assert ok is not None and ok.status == 200 and ok.json()["active_adapter"] == 1
    loads = [seen.json() for seen in fake_local.cloud.requests if seen.path.endswith("/load_lora_adapter")]
    assert loads and all(Path(load["lora_path"]).resolve() == served.resolve() for load in loads)


async def test_the_local_backend_reads_only_json_bodies() -> None:
    """A page on any site can make a browser post text/plain or a form to 127.0.0.1 (no CORS
    preflight for those): the local backend must not take those as a load request."""
    import httpx

    from local_backend.server import create_app
    from local_backend.settings import Settings

    app = create_app(Settings(model="unused"))  # no lifespan here: no model is loaded
    body = '{"lora_name": "support-v1", "lora_path": "/tmp", "load_inplace": true}'
    kinds = (
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:
        for content_type in kinds:
            for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/chat/completions"):
                reply = await client.post(path, content=body, headers={"content-type": content_type})
                assert reply.status_code == 400, (path, content_type, reply.text)
                assert "must be JSON" in reply.json()["error"]["message"]
        # JSON, or a body without a type (curl -d, as before), goes on to the engine (none here).
        for headers in ({"content-type": "application/json"}, {}):
            reply = await client.post("/v1/load_lora_adapter", content=body, headers=headers)
            assert "must be JSON" not in reply.text and reply.status_code >= 500


# --- SSRF ------------------------------------------------------------------------------------


def ssrf_fields(evil: Evil) -> dict[str, Any]:
    return {
        "api_base": evil.url,
        "base_url": evil.url,
        "api_key": "sk-evil-key",
        "custom_llm_provider": "openai",
        "extra_headers": {"Host": f"127.0.0.1:{evil.port}"},
        "headers": {"Host": f"127.0.0.1:{evil.port}"},
        "api_version": evil.url,
        "aws_bedrock_runtime_endpoint": evil.url,
        "model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "api_base": evil.url}}],
        "mock_response": "a scripted answer",
        "url": evil.url,
    }


def ssrf_headers(evil: Evil) -> list[tuple[str, str]]:
    target = f"127.0.0.1:{evil.port}"
    return [
        ("Host", target),
        ("X-Forwarded-Host", target),
        ("Forwarded", f"host={target};proto=http"),
        ("X-Original-URL", evil.url + "/models"),
        ("X-Rewrite-URL", evil.url + "/models"),
        ("X-Understudy-Upstream", evil.url),
        ("X-Understudy-Base-Url", evil.url),
    ]


def url_like_models(evil: Evil) -> list[str]:
    return [
        evil.url,
        f"127.0.0.1:{evil.port}",
        f"openai/{evil.url}",
        "ollama/llama3",
        "hosted_vllm/x",
        f"huggingface/{evil.url}",
        "azure/gpt-4o",
    ]


def path_tricks(evil: Evil) -> list[str]:
    host = f"127.0.0.1:{evil.port}"
    return [
        f"http://{host}/v1/models",  # absolute-form request target
        f"//{host}/v1/models",
        f"/v1/@{host}/models",
        f"/v1//{host}/models",
        f"/v1/%2F%2F{host}/models",
        f"/v1/http://{host}/models",
        f"/v1/http:%2F%2F{host}/models",
        f"/v1/..%2F..%2F..%2F{host}",
        f"/v1/%2e%2e/%2e%2e/{host}",
        f"/v1/models?url=http://{host}/&base_url=http://{host}/",
        f"/v1/models#@{host}",
        f"/v1/\\\\{host}\\models",
    ]


def test_the_client_never_chooses_the_upstream(
    gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer, evil: Evil
) -> None:
    lite = {
        "provider": "litellm",
        "model_prefix": "openai/",
        "base_url": fake_cloud.base_url,
        "api_key": "sk-lite",
    }
    gateway = gateway_factory(
        upstream={"base_url": fake_cloud.base_url, "api_key": "sk-configured"},
        upstreams={"lite": lite},
        routes=[
            {"name": "lite", "match": ["lite-*"], "upstream": "lite"},
            {"name": "lite-rewrite", "match": ["lr-*"], "upstream": "lite", "upstream_model": "gpt-4o-mini"},
        ],
    )
    port, fields, forwarded = gateway.port, ssrf_fields(evil), 0

    def post(
        body: dict[str, Any], headers: Sequence[tuple[str, str]] = (), route: str | None = None
    ) -> raw_http.Reply:
        nonlocal forwarded
        sent = [("Content-Type", "application/json"), ("Authorization", "Bearer sk-evil-key"), *headers]
        if route is not None:
            sent.append(("X-Understudy-Route", route))
        reply = raw_http.request(port, "POST", CHAT, sent, orjson.dumps(body))
        assert reply is not None and reply.status < 500, reply
        forwarded += reply.status == 200
        return reply

    # The OpenAI-compatible upstream: its URL is fixed; the body goes on untouched.
    for name, value in fields.items():
        assert post({"model": "gpt-4o-mini", "messages": HELLO, name: value}).status == 200
    assert post({"model": "gpt-4o-mini", "messages": HELLO, **fields, "stream": True}).status == 200
    for header in ssrf_headers(evil):
        assert post({"model": "gpt-4o-mini", "messages": HELLO}, [header]).status == 200
    for model in url_like_models(evil):
        assert post({"model": model, "messages": HELLO}).status == 200
    for target in path_tricks(evil):
        reply = raw_http.request(port, "GET", target)
        assert reply is not None and reply.status < 500, (target, reply)
    reply = raw_http.send(
        port, f"CONNECT 127.0.0.1:{evil.port} HTTP/1.1\r\nHost: 127.0.0.1:{evil.port}\r\n\r\n".encode()
    )
    assert reply is None or reply.status < 500

    # litellm: its control arguments are refused, one by one and all together, streamed or not.
    for name, value in fields.items():
        for body in (
            {"model": "lite-x", "messages": HELLO, name: value},
            {"model": "lr-x", "messages": HELLO, name: value, "stream": True},
        ):
            refused = post(body)
            assert refused.status == 400 and refused.json()["error"]["code"] == "unknown_parameter", (
                name,
                refused.body,
            )
    assert post({"model": "lite-x", "messages": HELLO, **fields}).status == 400
    # ... and a client's model string cannot pick another provider or host.
    for model in url_like_models(evil):
        assert post({"model": model, "messages": HELLO}, route="lite").status == 200
    for header in ssrf_headers(evil):
        assert post({"model": "lite-x", "messages": HELLO}, [header]).status == 200
    answer = post({"model": "lr-anything", "messages": HELLO}).json()
    assert answer["choices"][0]["message"]["content"] == "echo: hello"

    assert evil.connections == 0
    seen = fake_cloud.cloud.requests
    chats = [request for request in seen if request.path == CHAT]
    assert len(chats) == forwarded  # every answered chat went to the configured upstream
    keys = {request.headers.get("Authorization") for request in seen}
    assert keys == {"Bearer sk-configured", "Bearer sk-lite"}, keys
    assert all(request.headers.getall("Host") == [f"127.0.0.1:{fake_cloud.port}"] for request in seen)
    lite_bodies = [
        request.json() for request in chats if request.headers["Authorization"] == "Bearer sk-lite"
    ]
    models = {body["model"] for body in lite_bodies}
    assert "gpt-4o-mini" in models and "lr-anything" not in models  # the route's rewrite holds
    assert not any(set(body) & set(fields) for body in lite_bodies)


# --- secrets ---------------------------------------------------------------------------------


def plant() -> dict[str, str]:
    """Distinct secrets, each with a random core that nothing else could contain."""
    names = ("UPSTREAM_KEY", "LITELLM_KEY", "DOWN_KEY", "CLIENT_KEY", "ADMIN_KEY", "REDIS_PASSWORD")
    return {f"PLANTED_{name}": f"{name.lower().replace('_', '-')}-{secrets.token_hex(12)}" for name in names}


def leaks(planted: dict[str, str], outputs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(secret, where) for every output holding a secret's random core (also when masked)."""
    cores = {name: value.rsplit("-", 1)[1] for name, value in planted.items()}
    return [
        (name, where)
        for name, core in cores.items()
        for where, data in outputs.items()
        if core.encode() in data
    ]


def serve_config(root: Path, cloud: FakeCloudServer) -> Path:
    down = free_port()  # nobody listens there
    config = root / "gateway.yaml"
    config.write_text(
        f"""
data_dir: {root / "data"}
admin_key: ${{PLANTED_ADMIN_KEY}}
redis_url: redis://:${{PLANTED_REDIS_PASSWORD}}@127.0.0.1:{free_port()}/0
local: {{enabled: false}}
upstream:
  base_url: {cloud.base_url}
  api_key: ${{PLANTED_UPSTREAM_KEY}}
  retry: {{attempts: 2, backoff_initial_s: 0, backoff_max_s: 0}}
upstreams:
  lite:
    provider: litellm
    model_prefix: openai/
    base_url: {cloud.base_url}
    api_key: ${{PLANTED_LITELLM_KEY}}
  down:
    base_url: http://127.0.0.1:{down}/v1
    api_key: ${{PLANTED_DOWN_KEY}}
    retry: {{attempts: 1}}
auth:
  keys:
    - {{name: app, key: "${{PLANTED_CLIENT_KEY}}", limits: {{rpm: 100000}}}}
routes:
  - {{name: lite, match: ["lite-*"], upstream: lite}}
  - {{name: down, match: ["down-*"], upstream: down}}
"""
    )
    return config


@contextmanager
def understudy_serve(
    config: Path,
    env: dict[str, str],
    logs: Path,
    fd_limit: int | None = None,
    pid: list[int] | None = None,
) -> Iterator[int]:
    """`understudy serve` as a subprocess at debug level, its stdout and stderr in `logs`;
    under `fd_limit` open files (soft and hard) when given; its process id appended to `pid`."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("UNDERSTUDY_", "OPENAI_"))}
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    with (logs / "stdout").open("wb") as stdout, (logs / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [*command, "--log-level", "debug"],
            cwd=REPO,
            env={**environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=stderr,
            preexec_fn=None if fd_limit is None else lambda: limit_open_files(fd_limit),
        )
        if pid is not None:
            pid.append(process.pid)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    ready = raw_http.request(port, "GET", "/readyz")
                except OSError:
                    ready = None
                if ready is not None and ready.status == 200:
                    break
                assert process.poll() is None and time.monotonic() < deadline, (logs / "stderr").read_text()
                time.sleep(0.1)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def limit_open_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def exercise(port: int, planted: dict[str, str], replies: dict[str, raw_http.Reply]) -> None:
    """Successes, streams, upstream errors, an unreachable upstream, refused clients, the
    admin API, the dashboard's sign-in, metrics: every answer kept in `replies`."""
    client = ("Authorization", f"Bearer {planted['PLANTED_CLIENT_KEY']}")
    admin = ("Authorization", f"Bearer {planted['PLANTED_ADMIN_KEY']}")

    def call(
        label: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Any = None,
        status: int | None = None,
    ) -> raw_http.Reply:
        data = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
        sent = (
            [("Content-Type", "application/json")] if body is not None and not isinstance(body, bytes) else []
        )
        reply = raw_http.request(port, method, target, [*sent, *headers], data)
        assert reply is not None, label
        if status is not None:
            assert reply.status == status, (label, reply)
        replies[label] = reply
        return reply

    def chat(model: str, **extra: Any) -> dict[str, Any]:
        return {"model": model, "messages": HELLO, **extra}

    call("chat", "POST", CHAT, [client], chat("gpt-4o-mini"), 200)
    call(
        "stream",
        "POST",
        CHAT,
        [client],
        chat("gpt-4o-mini", stream=True, stream_options={"include_usage": True}),
        200,
    )
    call("upstream 401", "POST", CHAT, [client], chat("error-401"), 401)
    call("upstream 500", "POST", CHAT, [client], chat("error-500"), 500)
    call("upstream 429", "POST", CHAT, [client], chat("error-429-0"), 429)
    call("garbage", "POST", CHAT, [client], chat("garbage"), 502)
    call("unreachable", "POST", CHAT, [client], chat("down-x"), 502)
    call("litellm", "POST", CHAT, [client], chat("lite-x"), 200)
    call("litellm stream", "POST", CHAT, [client], chat("lite-x", stream=True), 200)
    call("litellm 401", "POST", CHAT, [client, ("X-Understudy-Route", "lite")], chat("error-401"), 401)
    call("litellm 500", "POST", CHAT, [client, ("X-Understudy-Route", "lite")], chat("error-500"))
    call("litellm refused", "POST", CHAT, [client], chat("lite-x", api_base="http://127.0.0.1:1"), 400)
    call("models", "GET", "/v1/models", [client], status=200)
    call("wrong key", "POST", CHAT, [("Authorization", "Bearer sk-wrong")], chat("gpt-4o-mini"), 401)
    call("no key", "POST", CHAT, [], chat("gpt-4o-mini"), 401)
    call("bad json", "POST", CHAT, [client, JSON], b"{nope", 400)  # type: ignore[list-item]
    for target in (
        "/admin/routes",
        "/admin/routes/default",
        "/admin/routes/down",
        "/admin/logs?limit=1000",
        "/admin/logs/export",
        "/admin/logs/export?kind=judge",
        "/admin/dashboard",
        "/admin/openapi.json",
    ):
        call(target, "GET", target, [admin], status=200)
    call("no job", "GET", "/admin/jobs/nope", [admin], status=404)
    call("not adaptive", "GET", "/admin/routes/default/adapters", [admin], status=409)
    call("admin wrong key", "GET", "/admin/routes", [("Authorization", "Bearer nope")], status=401)
    call("admin no key", "GET", "/admin/logs", [], status=401)
    signed_in = call(
        "ui login",
        "POST",
        "/ui/login",
        [("Content-Type", "application/x-www-form-urlencoded")],
        f"key={planted['PLANTED_ADMIN_KEY']}".encode(),
        303,
    )
    cookie = (signed_in.header("set-cookie") or "").split(";")[0]
    # A key in a URL never signs in (issue 19): the form is the only way.
    link = call("ui link", "GET", f"/ui/?key={planted['PLANTED_ADMIN_KEY']}", [], status=401)
    assert link.header("set-cookie") is None and link.header("location") is None
    call("ui page", "GET", "/ui/", [("Cookie", cookie)], status=200)
    call("ui wrong", "GET", "/ui/?key=nope", [], status=401)
    for target in ("/metrics", "/healthz", "/readyz"):
        call(target, "GET", target, [], status=200)


def test_planted_secrets_appear_nowhere(fake_cloud: FakeCloudServer, tmp_path: Path) -> None:
    planted = plant()
    config = serve_config(tmp_path, fake_cloud)
    replies: dict[str, raw_http.Reply] = {}
    data_files: dict[str, bytes] = {}
    with understudy_serve(config, planted, tmp_path) as port:
        exercise(port, planted, replies)
        for path in (tmp_path / "data").rglob("*"):  # while running: the WAL is there
            if path.is_file():
                data_files[f"{path} (running)"] = path.read_bytes()
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            data_files[str(path)] = path.read_bytes()
    outputs = {
        **{
            f"reply {label}": b"\n".join([str(r.status).encode(), repr(r.headers).encode(), r.body])
            for label, r in replies.items()
        },
        "stdout": (tmp_path / "stdout").read_bytes(),
        "stderr": (tmp_path / "stderr").read_bytes(),
        **data_files,
    }
    # The plants took: the upstreams got their keys, the store and the logs are not empty.
    sent = {request.headers.get("Authorization") for request in fake_cloud.cloud.requests}
    assert {f"Bearer {planted['PLANTED_UPSTREAM_KEY']}", f"Bearer {planted['PLANTED_LITELLM_KEY']}"} <= sent
    assert any(name.endswith("understudy.db-wal (running)") for name in data_files)
    assert b"redis limits unavailable" in outputs["stderr"] and b"DEBUG" in outputs["stderr"]
    assert replies["/admin/logs/export"].body.count(b"\n") >= 10
    assert leaks(planted, outputs) == []
    grepped = sum(map(len, outputs.values()))
    print(f"secrets: {len(planted)} planted, {len(outputs)} outputs grepped ({grepped} bytes)")


@pytest.mark.parametrize(
    ("template", "secret"),
    [
        ("upstream:\n  api_key: ${SECRET}\n", "*{core}"),  # read as a YAML alias
        ("upstream:\n  api_key: ${SECRET}\n", "{core}: x"),  # a mapping inside a value
        ("admin_key: [${SECRET}\n", "{core}"),  # broken YAML either way
        ("port: ${SECRET}\n", "{core}"),
        ("upstream:\n  provider: ${SECRET}\n", "{core}"),
        ("redis_url: [${SECRET}]\n", "{core}"),
        ("routes:\n  - name: ${SECRET}\n", "{core}/x"),
        ("auth:\n  keys:\n    - {name: '${SECRET}', key: x}\n", "{core} x"),
        ("upstream:\n  base_url: http://user:${SECRET}@127.0.0.1:1/v1\n", "{core}"),  # would break every call
        ("upstreams:\n  x: {base_url: 'http://${SECRET}@127.0.0.1:1/v1'}\n", "{core}"),
    ],
)
def test_config_errors_never_quote_a_secret(tmp_path: Path, template: str, secret: str) -> None:
    from gateway.settings import ConfigError, load_settings

    core = secrets.token_hex(12)
    config = tmp_path / "gateway.yaml"
    config.write_text(template)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={"SECRET": secret.format(core=core)})
    assert core not in str(caught.value), str(caught.value)
    assert str(config) in str(caught.value)  # still says where the problem is


def test_a_client_key_is_never_borrowed_for_judge_calls(
    gateway_factory: GatewayFactory, fake_cloud: FakeCloudServer, fake_local: FakeCloudServer, data_dir: Path
) -> None:
    """With client keys and an upstream without a key of its own, the gateway's own calls (spot
    checks here) must not borrow a client's gateway key: it is never forwarded upstream."""
    client_key = f"sk-client-{secrets.token_hex(12)}"
    plant_adapter(data_dir, "support", 1)
    gateway = adaptive_gateway(
        gateway_factory, fake_local, auth={"keys": [{"name": "app", "key": client_key}]}
    )
    for path, change in (("adapter", b'{"version": 1}'), ("mode", b'{"mode": "local"}')):
        done = raw_http.request(gateway.port, "POST", f"/admin/routes/support/{path}", [JSON], change)
        assert done is not None and done.status == 200, done
    body = orjson.dumps({"model": "support-x", "messages": HELLO})
    reply = raw_http.request(
        gateway.port, "POST", CHAT, [JSON, (b"Authorization", f"Bearer {client_key}".encode())], body
    )
    assert reply is not None and reply.status == 200 and reply.header("x-understudy-backend") == "local"
    (spot_check,) = gateway.wait_for_records(1, kind="shadow")  # eval_rate 1: the cloud is asked too
    assert spot_check["status"] == 200
    assert fake_cloud.cloud.requests, "the spot check reached the cloud"
    for request in [*fake_cloud.cloud.requests, *fake_local.cloud.requests]:
        assert client_key not in repr(dict(request.headers)), request.headers


async def test_cross_origin_browser_requests_are_refused(gateway_factory: Any) -> None:
    """A page elsewhere cannot make a browser spend the upstream's credits or flip a route
    through a gateway on the user's machine; the dashboard (same origin) and SDKs (no Origin)
    are unaffected."""
    gateway = gateway_factory()
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    host = gateway.url.removeprefix("http://")
    async with aiohttp.ClientSession() as session:
        for origin in ("https://evil.example", "null", f"http://{host}.evil.example"):
            for path, data in (
                ("/v1/chat/completions", body),
                ("/admin/routes/default/mode", b'{"mode": "cloud"}'),
            ):
                headers = {"origin": origin, "content-type": "text/plain"}
                async with session.post(gateway.url + path, data=data, headers=headers) as response:
                    assert response.status == 403, (origin, path)
                    assert (await response.json())["error"]["code"] == "cross_origin"
        for site in ("cross-site", "same-site"):  # what browsers send, Origin or not
            headers = {"sec-fetch-site": site, "content-type": "text/plain"}
            async with session.post(
                gateway.url + "/v1/chat/completions", data=body, headers=headers
            ) as response:
                assert response.status == 403, site
        same = {"origin": gateway.url, "content-type": "application/json"}
        async with session.post(gateway.url + "/v1/chat/completions", data=body, headers=same) as response:
            assert response.status == 200
        async with session.post(gateway.url + "/v1/chat/completions", data=body) as response:
            assert response.status == 200
    records = gateway.wait_for_records(7)
    assert sorted(r["status"] for r in records) == [200, 200, 403, 403, 403, 403, 403]
