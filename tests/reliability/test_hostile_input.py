"""Hostile clients: property-based request bodies and headers (hypothesis) sent over real
sockets to one running gateway, which forwards to the real-socket fake cloud.

For every input:
- no 5xx of the gateway's making: a 5xx may only be the fake upstream's own answer passed on
  (the fake answers 200 to anything valid enough; it fails on a few wrong types it reads);
- no crash: the gateway still answers /healthz afterwards;
- every error the gateway makes has OpenAI's shape {"error": {"message", "type", "param", "code"}};
- exactly one log record for each request the /v1 handler answered, with the status it answered.
Bytes uvicorn's HTTP parser refuses (a plain-text 400) never reach the gateway: counted apart.
The gateway runs with limits (so the token estimator reads every body) and with a route that
rewrites `model` and one that adapts, so those paths read every hostile body too.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.origin import AllowedHosts
from gateway.settings import load_settings
from gateway.store.base import RecordFilter
from tests.conftest import RunningGateway, start_gateway
from tests.reliability import raw_http

ROUTES = {"default", "rewrite", "adaptive"}
MODELS = ["m-echo", "rw-x", "ad-x", "gpt-4o-mini"]  # default, rewrite, adaptive, default
CHAT = "/v1/chat/completions"
JSON_HEADERS = (("Content-Type", "application/json"),)
BASE = {"model": "m-echo", "messages": [{"role": "user", "content": "hi"}]}
MAX_BODY = 10 * 1024 * 1024
# Inputs tried, per property: quoted by the docs, printed at the end of the module.
TRIED: Counter[str] = Counter()


def fast(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


def is_openai_error(reply: raw_http.Reply) -> bool:
    try:
        error = reply.json()["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return (
        isinstance(error, dict)
        and {"message", "type", "param", "code"} <= set(error)
        and isinstance(error["message"], str)
        and isinstance(error["type"], str)
    )


@dataclass
class Target:
    gateway: RunningGateway
    cloud: FakeCloudServer
    # Answered by the /v1 handler since the last check: request id -> status.
    answered: dict[str, int] = field(default_factory=dict)
    unshaped: set[str] = field(default_factory=set)
    refused_by_parser: int = 0
    records_checked: int = 0
    last_record_id: int = 0

    @property
    def port(self) -> int:
        return self.gateway.port

    def send(self, request: bytes, parser_may_refuse: bool = False) -> raw_http.Reply:
        reply = raw_http.send(self.port, request)
        assert reply is not None, "the gateway closed the connection without answering"
        request_id = reply.header("x-request-id")
        if request_id is None:  # it never reached the app: uvicorn refused the bytes
            assert parser_may_refuse, f"answered without a request id: {reply}"
            assert reply.status == 400, reply
            self.refused_by_parser += 1
            return reply
        assert reply.header("x-understudy-route") in ROUTES, reply.headers
        assert request_id not in self.answered
        self.answered[request_id] = reply.status
        if reply.status >= 400 and not is_openai_error(reply):
            self.unshaped.add(request_id)
        return reply

    def post(
        self, body: bytes, path: str = CHAT, headers: tuple[tuple[str, str], ...] = JSON_HEADERS
    ) -> raw_http.Reply:
        return self.send(raw_http.build("POST", path, headers, body))

    def check(self) -> None:
        """One record per answered request, with its status; every 5xx and every error not in
        OpenAI's shape was the upstream's own answer passed on (its record says so)."""
        store = self.gateway.app.services.store
        deadline = time.monotonic() + 10
        while True:
            rows = store.list_records(RecordFilter(after_id=self.last_record_id), limit=1_000_000)
            if len(rows) >= len(self.answered) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        by_id = {row["request_id"]: row for row in rows}
        assert len(rows) == len(self.answered), "records lost or made up"
        assert set(by_id) == set(self.answered)
        for request_id, status in self.answered.items():
            row = by_id[request_id]
            assert row["status"] == status, row
            if status >= 500 or request_id in self.unshaped:
                assert (row["error"] or "").startswith("upstream answered"), row
        self.last_record_id = max([self.last_record_id, *(row["id"] for row in rows)])
        self.records_checked += len(rows)
        self.answered.clear()
        self.unshaped.clear()
        health = raw_http.request(self.port, "GET", "/healthz")
        assert health is not None and health.status == 200 and health.json() == {"status": "ok"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Target]:
    # Module-scoped: one gateway for every property (the conftest fixtures are per test).
    cloud = FakeCloudServer(FakeCloud()).start()
    root = tmp_path_factory.mktemp("hostile")
    config = root / "gateway.yaml"
    config.write_text("{}\n")
    with socket.socket() as probe:  # a loopback port nobody listens on: the local backend
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]
    settings = load_settings(
        config,
        environ={},
        data_dir=root / "data",
        upstream={
            "base_url": cloud.base_url,
            "limits": {"rpm": 10**9, "tpm": 10**10, "max_concurrency": 64},
            # The fake fails with a 500 on a few wrong types it reads (a real API says 400):
            # pass those on once, and never let them open the circuit for the next inputs.
            "retry": {"attempts": 1},
            "breaker": {"failure_threshold": 10**9},
        },
        local={"enabled": True, "base_url": f"http://127.0.0.1:{nobody}/v1"},
        routes=[
            {"name": "rewrite", "match": ["rw-*"], "upstream_model": "gpt-4o-mini"},
            {
                "name": "adaptive",
                "match": ["ad-*"],
                "adapt": True,
                "policy": {"min_samples": 10**9, "judge": "exact"},
            },
        ],
    )
    gateway = start_gateway(settings)
    found = Target(gateway, cloud)
    yield found
    gateway.stop()
    cloud.stop()
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    summary = ", ".join(f"{name} {count}" for name, count in TRIED.items())
    line = (
        f"hostile input: {sum(TRIED.values())} inputs ({summary}); {found.records_checked} log records "
        f"checked; {found.refused_by_parser} refused by the HTTP parser before the gateway"
    )
    print(line)
    if reporter is not None:  # shown after the run's summary, outside the captured output
        pytestconfig.add_cleanup(lambda: reporter.write_line(line))


@pytest.fixture(autouse=True)
def fresh_check(target: Target) -> None:
    """Each test checks only its own requests, even when one before it failed half-way."""
    newest = target.gateway.app.services.store.list_records(RecordFilter(), limit=1)
    target.last_record_id = newest[0]["id"] if newest else 0
    target.answered.clear()
    target.unshaped.clear()


def route_for(model: str) -> str:
    return "rewrite" if model.startswith("rw-") else "adaptive" if model.startswith("ad-") else "default"


# --- strategies ------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MODEL_VALUES = st.sampled_from(MODELS) | st.text(max_size=40).map(lambda text: "m-" + text) | JSON_VALUES
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | JSON_VALUES,
            "content": JSON_VALUES,
        }
    )
    | JSON_VALUES,
    max_size=4,
)
# The fake cloud builds `n` choices: it gets wrong types, never a billion choices.
SMALL_N = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(-3, 3)
    | st.text(max_size=3)
    | st.lists(SCALARS, max_size=2)
)
BIG_INTS = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, -1, 2**63 - 1, 2**64 - 1, -(2**63)])
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": MODEL_VALUES,
    "messages": MESSAGES | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES,
    "stream_options": st.fixed_dictionaries({"include_usage": JSON_VALUES}) | JSON_VALUES,
    "max_tokens": BIG_INTS | JSON_VALUES,
    "max_completion_tokens": BIG_INTS | JSON_VALUES,
    "temperature": st.floats(allow_nan=False, allow_infinity=False) | JSON_VALUES,
    "top_p": JSON_VALUES,
    "n": SMALL_N,
    "tools": st.lists(st.fixed_dictionaries({"type": JSON_VALUES, "function": JSON_VALUES}), max_size=2)
    | JSON_VALUES,
    "tool_choice": JSON_VALUES,
    "response_format": JSON_VALUES,
    "stop": JSON_VALUES,
    "user": JSON_VALUES,
    "logit_bias": JSON_VALUES,
    "seed": BIG_INTS | JSON_VALUES,
    "functions": JSON_VALUES,
    "parallel_tool_calls": JSON_VALUES,
    "logprobs": JSON_VALUES,
    "metadata": JSON_VALUES,
}


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = dict(BASE)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        body[name] = draw(FIELDS[name])
    for name in draw(st.lists(st.sampled_from(["model", "messages"]), max_size=2, unique=True)):
        body.pop(name, None)
    return body


def _pair(key: str, value: Any) -> bytes:
    return orjson.dumps(key) + b":" + orjson.dumps(value)


@st.composite
def duplicate_keys(draw: st.DrawFn) -> bytes:
    """An object naming the same field more than once (the last one wins, as in orjson)."""
    pairs = [("model", draw(st.sampled_from(MODELS))), ("messages", BASE["messages"])]
    pairs += draw(
        st.lists(
            st.tuples(st.sampled_from(["model", "stream", "messages", "max_tokens"]), SCALARS), max_size=6
        )
    )
    return b"{" + b",".join(_pair(key, value) for key, value in draw(st.permutations(pairs))) + b"}"


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 1200) | st.sampled_from([253, 254, 255, 1023, 1024, 1025]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    nested = opener * depth + (b"1" if opener == b'{"a":' else b"") + closer * depth
    model = orjson.dumps(draw(st.sampled_from(MODELS)))
    where = draw(st.sampled_from(["messages", "extra", "content", "top"]))
    if where == "top":
        return nested
    if where == "messages":
        return b'{"model":' + model + b',"messages":' + nested + b"}"
    if where == "content":
        return b'{"model":' + model + b',"messages":[{"role":"user","content":' + nested + b"}]}"
    return b'{"model":' + model + b',"messages":[{"role":"user","content":"x"}],"extra":' + nested + b"}"


@st.composite
def huge_strings(draw: st.DrawFn) -> bytes:
    text = draw(st.characters()) * draw(st.integers(0, 3_000_000))
    where = draw(st.sampled_from(["content", "model", "key", "user"]))
    if where == "model":
        return orjson.dumps({**BASE, "model": "m-" + text})
    if where == "key":
        return orjson.dumps({**BASE, text: 1})
    if where == "user":
        return orjson.dumps({**BASE, "user": text})
    return orjson.dumps({**BASE, "messages": [{"role": "user", "content": text}]})


@st.composite
def broken_text(draw: st.DrawFn) -> bytes:
    """Valid JSON syntax holding what is not text: invalid UTF-8 bytes, lone surrogate escapes."""
    junk = draw(
        st.binary(min_size=1, max_size=8).filter(lambda b: b'"' not in b and b"\\" not in b)
        | st.sampled_from(
            [b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"]
        )
    )
    model = draw(st.sampled_from(MODELS)).encode()
    where = draw(st.sampled_from(["content", "model", "key"]))
    if where == "model":
        return b'{"model":"' + junk + b'","messages":[{"role":"user","content":"x"}]}'
    if where == "key":
        return b'{"model":"' + model + b'","' + junk + b'":1,"messages":[]}'
    return b'{"model":"' + model + b'","messages":[{"role":"user","content":"a' + junk + b'b"}]}'


NOT_OBJECTS = JSON_VALUES.filter(lambda value: not isinstance(value, dict)).map(orjson.dumps)
DOCUMENTS = NOT_OBJECTS | duplicate_keys() | deep_nesting() | huge_strings() | broken_text()


# --- properties: each drives its examples, then checks the records and the gateway's health --


def test_wrong_types_in_every_chat_field(target: Target) -> None:
    @fast(300)
    @given(body=chat_bodies())
    def run(body: dict[str, Any]) -> None:
        TRIED["wrong types"] += 1
        reply = target.post(orjson.dumps(body))
        model, stream = body.get("model"), body.get("stream", False)
        wrong_model = model is not None and not isinstance(model, str)
        if wrong_model or (stream is not None and not isinstance(stream, bool)):
            assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_type"

    run()
    target.check()


def test_any_json_document(target: Target) -> None:
    @fast(200)
    @given(document=DOCUMENTS)
    def run(document: bytes) -> None:
        TRIED["json documents"] += 1
        reply = target.post(document)
        try:
            parsed = orjson.loads(document)
        except orjson.JSONDecodeError:
            assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_json"
            return
        if not isinstance(parsed, dict):
            assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_json"
        elif isinstance(parsed.get("model"), str) and reply.status == 200:
            # Read as the upstream reads it (the last of duplicate keys): no parser differential.
            assert reply.header("x-understudy-route") == route_for(parsed["model"])

    run()
    target.check()


CONTENT_TYPES = [
    "application/json",
    "",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
]
PATHS = [CHAT, "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/files", "/v1/models"]


def test_arbitrary_bytes_as_body(target: Target) -> None:
    @fast(200)
    @given(
        body=st.binary(max_size=4096),
        content_type=st.sampled_from(CONTENT_TYPES),
        path=st.sampled_from(PATHS),
    )
    def run(body: bytes, content_type: str, path: str) -> None:
        TRIED["arbitrary bytes"] += 1
        reply = target.post(body, path, (("Content-Type", content_type),) if content_type else ())
        if "json" in content_type and body:
            try:
                is_object = isinstance(orjson.loads(body), dict)
            except orjson.JSONDecodeError:
                is_object = False
            if not is_object:
                assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_json"

    run()
    target.check()


# Lines a client tries to slip in inside a header value: if the parser takes them as lines of
# their own, the gateway must still never pass them on (control headers are dropped, Host is the
# upstream's own).
SMUGGLED = [b"X-Understudy-Smuggled: 1", b"Host: 127.0.0.1:1"]
HEADER_NAMES = st.sampled_from(
    [
        "X-Understudy-Route",
        "X-Understudy-Backend",
        "X-Understudy-Anything",
        "Authorization",
        "Content-Type",
        "Host",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Cookie",
        "User-Agent",
        "Accept-Encoding",
        "Expect",
        "X-Request-Id",
    ]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.!#$%&'*+^`|~0123456789", min_size=1, max_size=20)
HEADER_VALUES = (
    st.binary(max_size=40)
    | st.text(max_size=30).map(str.encode)
    | st.sampled_from(
        sorted(ROUTES | {"", "../../etc/passwd", "default\tx", "%2e%2e", "http://127.0.0.1:1/"})
    ).map(str.encode)
    | st.builds(
        lambda sep, line: b"a" + sep + line,
        st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00"]),
        st.sampled_from(SMUGGLED),
    )
    | st.integers(1, 200_000).map(lambda size: b"v" * size)
)
FRAMING = (b"content-length", b"transfer-encoding", b"connection")
ROUTE_NAMES = {route.encode() for route in ROUTES}


def test_hostile_headers(target: Target) -> None:
    @fast(250)
    @given(
        headers=st.lists(st.tuples(HEADER_NAMES.map(str.encode), HEADER_VALUES), max_size=5),
        body=st.sampled_from([BASE, {**BASE, "stream": True}, {**BASE, "model": "rw-x"}]).map(orjson.dumps),
    )
    def run(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        TRIED["headers"] += 1
        # Framing headers are the parser's business (and would leave requests half-sent).
        sent = [(name, value) for name, value in headers if name.lower() not in FRAMING]
        cloud = target.cloud.cloud
        cloud.requests.clear()
        request = raw_http.build("POST", CHAT, [(b"Content-Type", b"application/json"), *sent], body)
        reply = target.send(request, parser_may_refuse=True)
        for seen in cloud.requests:
            assert not any(name.lower().startswith("x-understudy-") for name in seen.headers)
            assert seen.headers.getall("Host") == [f"127.0.0.1:{target.cloud.port}"]
        cloud.requests.clear()
        hosts = [value for name, value in sent if name.lower() == b"host"] or [b"127.0.0.1"]  # build's
        smuggled = any(b"Host: " in value for _, value in sent)  # a second Host, if the parser splits
        code = (
            reply.json()["error"]["code"] if reply.status in (400, 403) and is_openai_error(reply) else None
        )
        if code in ("host_not_allowed", "invalid_host"):
            # Refused before anything else (issue 19): a Host not one of the gateway's, or two.
            assert smuggled or len(hosts) > 1 or not AllowedHosts().allows(hosts[0]), sent
            return
        forced = [value.strip(b" \t") for name, value in sent if name.lower() == b"x-understudy-route"]
        if reply.header("x-request-id") is not None and forced and forced[0] not in ROUTE_NAMES:
            assert reply.status == 400 and reply.json()["error"]["code"] == "unknown_route"

    run()
    target.check()


def test_well_formed_requests_round_trip_with_the_openai_sdk(target: Target) -> None:
    client = openai.OpenAI(base_url=target.gateway.url + "/v1", api_key="sk-client", max_retries=0)

    @fast(100)
    @given(
        content=st.text(max_size=200),
        model=st.sampled_from(MODELS),
        stream=st.booleans(),
        max_tokens=st.none() | st.integers(1, 2**31),
        temperature=st.none() | st.floats(0, 2),
    )
    def run(
        content: str, model: str, stream: bool, max_tokens: int | None, temperature: float | None
    ) -> None:
        TRIED["openai sdk"] += 1
        options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        messages: Any = [{"role": "user", "content": content}]
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,
            stream=stream,
            **{k: v for k, v in options.items() if v is not None},
        )
        target.answered[raw.headers["x-request-id"]] = raw.status_code
        answer: Any = raw.parse()
        if stream:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in answer if chunk.choices)
        else:
            text = answer.choices[0].message.content
        assert text == f"echo: {content}"  # every character there and back

    run()
    target.check()


# --- one input each: the edges the properties above only sometimes reach ---------------------


def test_unknown_route_header_is_echoed_readably(target: Target) -> None:
    for value, shown in [("café ☕".encode(), "'café ☕'"), (b"a\xff\xfeb", "'a\ufffd\ufffdb'")]:
        reply = target.send(
            raw_http.build(
                "POST",
                CHAT,
                [(b"Content-Type", b"application/json"), (b"X-Understudy-Route", value)],
                orjson.dumps(BASE),
            )
        )
        error = reply.json()["error"]
        assert reply.status == 400 and error["code"] == "unknown_route"
        assert f"unknown route {shown} in X-Understudy-Route" == error["message"]
        assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in error["message"])
    target.check()


def deepest(before: bytes, after: bytes) -> bytes:
    """`before` + the deepest list orjson (the gateway's parser) still reads + `after`."""
    for depth in range(1024, 0, -1):
        body = before + b"[" * depth + b"]" * depth + after
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        return body
    raise AssertionError("unreachable")


def test_the_deepest_json_the_parser_reads(target: Target) -> None:
    # Outside hypothesis, which raises the recursion limit (for every thread) while it runs.
    for model in MODELS:
        start = b'{"model":"' + model.encode() + b'","stream":true,'
        for body in (
            deepest(start + b'"messages":', b"}"),
            deepest(start + b'"messages":[{"role":"user","content":', b"}]}"),
            deepest(start + b'"messages":[{"role":"user","content":"x"}],"extra":', b"}"),
        ):
            target.post(body)  # the fake cloud fails on some of these: check() allows only that
    target.check()


def test_body_size_limit_is_exact(target: Target) -> None:
    padding = b" " * (MAX_BODY - len(orjson.dumps(BASE)))
    assert target.post(orjson.dumps(BASE) + padding).status == 200
    too_big = target.post(orjson.dumps(BASE) + padding + b" ")
    assert too_big.status == 413 and too_big.json()["error"]["code"] == "request_too_large"
    # A declared length over the limit is refused before the body is read.
    declared = raw_http.build(
        "POST", CHAT, [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % (MAX_BODY + 1))]
    )
    assert target.send(declared).status == 413
    target.check()


def test_header_bytes_pass_through_unchanged(target: Target) -> None:
    cloud = target.cloud.cloud
    cloud.requests.clear()
    title = "café ☕ 漢字".encode()
    target.send(
        raw_http.build(
            "POST", CHAT, [(b"Content-Type", b"application/json"), (b"X-Title", title)], orjson.dumps(BASE)
        )
    )
    # The fake (aiohttp) reads header bytes as UTF-8: the same text means the same bytes.
    assert cloud.requests[-1].headers["X-Title"].encode("utf-8", "surrogateescape") == title
    cloud.requests.clear()
    target.check()


def test_upstream_header_bytes_come_back_unchanged(data_dir: Path) -> None:
    # A hostile (or just unusual) upstream: header values that are UTF-8, not Latin-1.
    value = "naïve € 漢字".encode()
    listener = socket.create_server(("127.0.0.1", 0))
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Odd: "
        + value
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(1 << 16)
                connection.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    config = data_dir / "gateway.yaml"
    config.write_text("{}\n")
    port = listener.getsockname()[1]
    settings = load_settings(
        config,
        environ={},
        data_dir=data_dir,
        upstream={"base_url": f"http://127.0.0.1:{port}/v1"},
        local={"enabled": False},
    )
    gateway = start_gateway(settings)
    try:
        reply = raw_http.request(
            gateway.port, "POST", "/v1/things", [(b"Content-Type", b"application/json")], b"{}"
        )
    finally:
        gateway.stop()
        listener.close()
    assert reply is not None and reply.status == 200
    assert reply.header("x-odd") == value.decode("latin-1")  # raw_http reads headers as Latin-1: same bytes


def test_absurd_max_tokens_does_not_lock_everyone_out(target: Target) -> None:
    # A stream without include_usage keeps its token estimate: an unbounded estimate would fill
    # the upstream's shared tokens-per-minute bucket for millennia.
    greedy = {**BASE, "stream": True, "max_tokens": 2**64 - 1, "n": 2**63 - 1}
    assert target.post(orjson.dumps(greedy)).status == 200
    polite = target.post(orjson.dumps(BASE))
    assert polite.status == 200, polite.body
    target.check()


def test_huge_model_names_are_not_kept(target: Target) -> None:
    """Routing and pricing cache client model strings: a cache bounded in entries must also
    not keep megabyte-long names (4096 of 10 MB each would be 40 GB)."""
    cloud = target.cloud.cloud
    cloud.record = False
    name_size, count = 1 << 20, 40
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        statuses = [
            target.post(orjson.dumps({**BASE, "model": f"m-{i}-" + "x" * name_size})).status
            for i in range(count)
        ]
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        cloud.record = True
    assert statuses == [200] * count
    assert kept < count * name_size / 4, f"{kept / 2**20:.0f} MiB kept after {count} one-MiB model names"
    target.check()


def test_admin_reads_every_hostile_record(target: Target) -> None:
    """Whatever clients sent is stored; reading it back (the log API, the export) still works."""
    store = target.gateway.app.services.store
    total = store.count_records(RecordFilter())
    assert total == target.records_checked
    seen, cursor = 0, None
    while True:
        query = "/admin/logs?limit=100" + (f"&cursor={cursor}" if cursor else "")
        page = raw_http.request(target.port, "GET", query)
        assert page is not None and page.status == 200, page
        data = page.json()
        seen += len(data["data"])
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert seen == total
    export = raw_http.request(target.port, "GET", "/admin/logs/export?kind=user")
    assert export is not None and export.status == 200
    lines = export.body.splitlines()
    assert len(lines) == total
    assert all(isinstance(orjson.loads(line), dict) for line in lines)
    health = raw_http.request(target.port, "GET", "/healthz")
    assert health is not None and health.status == 200
