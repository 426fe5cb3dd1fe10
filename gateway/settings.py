"""One typed settings object, loaded once from `gateway.yaml` plus UNDERSTUDY_* environment.

Precedence: built-in defaults < gateway.yaml < environment. `${VAR}` and `${VAR:-default}`
are interpolated inside the YAML text before it is parsed. Unknown keys are rejected with a
message that names the key, so a typo never silently does nothing.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.limits.settings import AuthSettings, BreakerSettings, LimitSettings, RetrySettings

DEFAULT_UPSTREAM = "default"
DEFAULT_ROUTE = "default"
DEFAULT_LOCAL_MODEL = "SmolLM2-135M-Instruct"
ROUTE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SERVER_NAME_PATTERN = r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamSettings(_Strict):
    """A cloud LLM the gateway forwards to."""

    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    # `openai`: any OpenAI-compatible API, forwarded byte for byte on a pooled aiohttp client.
    # `litellm`: another provider (Anthropic, Gemini, Bedrock...) through litellm's translation.
    provider: Literal["openai", "litellm"] = "openai"
    # For `openai`: the HTTP client. `httptools`: the gateway's pooled HTTP/1.1 client
    # (gateway/upstream/http1.py, about half aiohttp's cost per call); `aiohttp`: aiohttp's.
    client: Literal["httptools", "aiohttp"] = "httptools"
    # For `litellm`: the prefix litellm uses to pick the provider, e.g. "anthropic/".
    model_prefix: str = ""
    # For `litellm` with Azure OpenAI ("azure/"): the API version, e.g. "2024-10-21".
    api_version: str | None = None
    timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    # Longest silence allowed between two bytes of an upstream answer (first byte included).
    read_timeout_s: float = Field(300.0, gt=0)
    max_connections: int = Field(512, ge=1)
    # A non-streamed answer is read whole before it is logged and sent on: larger ones are a
    # 502, so no upstream can exhaust the gateway's memory. Streams are relayed as they come.
    max_response_bytes: int = Field(256 * 1024 * 1024, ge=1)
    limits: LimitSettings | None = None
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("api_key")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        # aiohttp refuses a URL's user:password next to an Authorization header (the key, or
        # the client's), so every call would fail; and the message must not repeat the URL.
        if urlsplit(value).username is not None:
            raise ValueError("credentials in the URL are not supported: give the key as api_key")
        return value


class SyntheticSettings(_Strict):
    """Synthetic data for a route with too little traffic (gateway.adaptive.synthetic)."""

    enabled: bool = False
    # Real pairs needed before the cloud is asked to write more like them.
    seed_samples: int = Field(20, ge=1)
    # Real + synthetic pairs to reach (default: the route's min_samples).
    target_samples: int | None = Field(None, ge=1)
    # The route's total spend on synthetic data (prompt writing and answers), ever.
    max_cost_usd: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    per_call: int = Field(5, ge=1, le=50)


class PolicySettings(_Strict):
    """When a route moves between cloud and local (used by the adaptive cycle)."""

    min_samples: int = Field(200, ge=1)
    threshold: float = Field(70.0, ge=0, le=100)
    # While local, demote when the rolling mean score falls below this (default: threshold).
    # Pass/fail judges (exact, json_equal) score 0 or 100, so with threshold 100 the default
    # demotes on the first failed spot check; a lower bar here tolerates a small error rate.
    min_rolling_score: float | None = Field(None, ge=0, le=100)
    # Promotion is a sequential test: at least promote_after verdicts and the 95% Wilson lower
    # bound of the pass rate at or above min_pass_rate; the upper bound below it rejects.
    promote_after: int = Field(20, ge=1)
    min_pass_rate: float = Field(0.8, ge=0, le=1)
    eval_rate: float = Field(0.05, ge=0, le=1)
    window: int = Field(50, ge=1)
    # While local: this many failed spot checks in a row send the route back (a sudden break);
    # a slow slide is caught by the pass rate's upper bound falling below min_pass_rate.
    demote_after: int = Field(3, ge=1)
    # Between training jobs. After a candidate is rejected, the retry (from that candidate and
    # what it got wrong) waits only retry_after_reject_s, doubled for each rejection in a
    # row, never longer than cooldown_s.
    cooldown_s: float = Field(3600.0, ge=0)
    retry_after_reject_s: float = Field(300.0, ge=0)
    judge: Literal["upstream", "exact", "json_equal", "embedding"] = "upstream"
    # The model that grades (upstream judge). Default: the route's upstream_model, else the
    # model of the request being judged. Called through the route's own upstream.
    judge_model: str | None = None
    # An eval that has not decided by then goes back to the cloud, with the reason in the
    # route's history; so does one whose answers fail to be judged this many times in a row.
    eval_timeout_s: float = Field(1800.0, gt=0)
    max_judge_errors: int = Field(10, ge=1)
    synthetic: SyntheticSettings = SyntheticSettings()


class RouteSettings(_Strict):
    """A unit that adapts: matched by request `model` (exact or glob) or forced by header."""

    name: str = Field(pattern=ROUTE_NAME_PATTERN)
    match: list[str] = Field(default_factory=list)
    upstream: str = DEFAULT_UPSTREAM
    # Rewrite the `model` sent upstream; None keeps the client's.
    upstream_model: str | None = None
    adapt: bool = False
    local_model: str = DEFAULT_LOCAL_MODEL
    policy: PolicySettings = PolicySettings()
    # Trainer overrides for this route (epochs, lora_r, learning_rate, max_length, ...): any
    # field of trainer.spec.TrainSpec except where it runs.
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("training")
    @classmethod
    def _valid_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        from trainer.spec import TrainSpec

        forbidden = {"data", "store_url", "base_model", "init_adapter", "failed_data"} & set(value)
        if forbidden:
            raise ValueError(f"set per job, not per route: {', '.join(sorted(forbidden))}")
        TrainSpec.model_validate(value)  # names the bad key or value
        return value

    limits: LimitSettings | None = None

    def matches(self, model: str) -> bool:
        return any(model == pattern or fnmatch.fnmatchcase(model, pattern) for pattern in self.match)


class LocalSettings(_Strict):
    """The local model server: started as a child process unless `base_url` points elsewhere."""

    enabled: bool = True
    base_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(7000, ge=1, le=65535)
    model: str = DEFAULT_LOCAL_MODEL
    startup_timeout_s: float = Field(300.0, gt=0)
    # CPU threads for generation. Default: half the cores, because training jobs and the
    # gateway share the machine and torch slows 5-10x when its threads are oversubscribed.
    threads: int | None = Field(None, ge=1)
    # auto: bfloat16 on CUDA or on a CPU with native bf16 (AVX512-bf16 or AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # int8: weight-only int8 linear layers; int4: weight-only int4 per group, the head included,
    # CPU only (both need torchao); LoRA adapters keep their dtype.
    # auto (the default): int4 on a CPU with native bf16 where torchao is installed, else none.
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    limits: LimitSettings | None = None

    @model_validator(mode="after")
    def _quantizer_installed(self) -> LocalSettings:
        # The backend runs in this interpreter: say now, not in its log after each restart.
        managed = self.enabled and self.base_url is None
        if managed and self.quantize in ("int8", "int4") and importlib.util.find_spec("torchao") is None:
            raise ValueError(
                f"local.quantize: {self.quantize} needs torchao, which is not installed: "
                "pip install 'understudy[local]' (or pip install 'torchao>=0.18,<0.19')"
            )
        if self.quantize == "int4" and self.dtype == "float32":
            raise ValueError("local.quantize int4 computes in bfloat16; set local.dtype auto or bfloat16")
        return self


class LogSettings(_Strict):
    # Batches grow under load (group commit); this caps one transaction.
    max_batch: int = Field(512, ge=1)
    # Records waiting for the store beyond this are still kept, but counted and warned about.
    queue_warn_depth: int = Field(10_000, ge=1)
    # While the store fails (disk full, read-only), up to this many records wait in memory
    # and are written once it works again; older ones beyond it are dropped and counted in
    # understudy_log_write_errors_total.
    spill_limit: int = Field(100_000, ge=1)


class ServerSettings(_Strict):
    """What uvicorn does not bound about a client's socket (gateway.web.connections)."""

    # A request's head must arrive within this of its first byte (or of the connection
    # opening), else 408 and close; its body within body_timeout_s of the head, else close.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    keep_alive_timeout_s: int = Field(5, ge=1)
    # A request head larger than this: 431 and close (httptools itself has no cap).
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    # Open client connections at most; beyond, the one idle longest is closed (or, when all
    # are busy, the newcomer gets a 503). Default: half the file-descriptor limit less 64,
    # since a proxied request holds two (the client's and the upstream's).
    max_connections: int | None = Field(None, ge=1)


class UISettings(_Strict):
    # auto: the session cookie is Secure when the gateway itself serves https; always: also
    # behind a TLS-terminating proxy, where the gateway sees http.
    secure_cookies: Literal["auto", "always"] = "auto"
    session_ttl_s: float = Field(8 * 3600.0, ge=60)


class PriceSettings(_Strict):
    """A model's price in USD per million tokens (a self-hosted upstream, a negotiated rate,
    a model litellm's map does not know). `cached_input`: prompt tokens the upstream served
    from its cache (usage `prompt_tokens_details.cached_tokens`); unset = the map's cached
    rate if the model is in it, else `input`."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)


class Settings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path(".understudy")
    # Adapter versions (ROUTE/vN/), default data_dir/adapters. Replicas and the local backend
    # share it as one volume, mounted at the same path in each (the backend is sent paths).
    adapters_dir: Path | None = None
    # Empty: SQLite at data_dir/understudy.db; `sqlite:///PATH` puts it elsewhere;
    # `postgresql://USER:PASSWORD@HOST:PORT/DB` is shared by several replicas.
    database_url: str | None = None
    redis_url: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    # An uploaded dataset (POST /admin/routes/{name}/dataset) at most.
    max_import_bytes: int = Field(100 * 1024 * 1024, ge=1)
    upstream: UpstreamSettings = UpstreamSettings()
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    local: LocalSettings = LocalSettings()
    routes: list[RouteSettings] = Field(default_factory=list)
    log: LogSettings = LogSettings()
    auth: AuthSettings = AuthSettings()
    # Host names clients use for this gateway besides IP addresses and localhost, e.g.
    # "gateway.internal" or "*.example.com"; any other Host is refused (DNS rebinding).
    server_names: list[str] = Field(default_factory=list)
    server: ServerSettings = ServerSettings()
    ui: UISettings = UISettings()
    # Per-model prices that override or add to litellm's map, by model name as sent upstream.
    pricing: dict[str, PriceSettings] = Field(default_factory=dict)

    @field_validator("admin_key", "database_url", "redis_url")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("database_url")
    @classmethod
    def _supported_store(cls, value: str | None) -> str | None:
        if value is None or value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            return value
        scheme = value.split(":", 1)[0]
        raise ValueError(
            f"unsupported scheme {scheme!r}: leave it empty, or use sqlite:///PATH or postgresql://..."
        )

    @field_validator("server_names")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        cleaned = [name.strip().lower().rstrip(".") for name in names]
        for name in cleaned:
            if not re.fullmatch(SERVER_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a host name or *.suffix (no scheme, no port)")
        return cleaned

    @property
    def store_url(self) -> str:
        """The log store's URL: the one configured, else SQLite under the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'understudy.db'}"

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [route.name for route in self.routes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate route names: {', '.join(duplicates)}")
        known = {DEFAULT_UPSTREAM, *self.upstreams}
        for index, route in enumerate(self.routes):
            if route.upstream not in known:
                raise ValueError(
                    f"routes[{index}].upstream: unknown upstream {route.upstream!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        return self

    def upstream_named(self, name: str) -> UpstreamSettings:
        return self.upstream if name == DEFAULT_UPSTREAM else self.upstreams[name]

    def all_routes(self) -> list[RouteSettings]:
        """Configured routes in match order, ending with the `default` catch-all."""
        routes = list(self.routes)
        if not any(route.name == DEFAULT_ROUTE for route in routes):
            routes.append(RouteSettings(name=DEFAULT_ROUTE))
        return routes

    @property
    def adapters_root(self) -> Path:
        """Absolute: the local backend is sent these paths and may run in another directory."""
        return (self.adapters_dir or self.data_dir / "adapters").absolute()

    @property
    def local_base_url(self) -> str:
        return self.local.base_url or f"http://{self.local.host}:{self.local.port}/v1"

    @property
    def manages_local_backend(self) -> bool:
        return self.local.enabled and self.local.base_url is None


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Replace `${VAR}` / `${VAR:-default}`; an unset variable without default becomes ''."""
    return _INTERPOLATION.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), text)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    simple = {
        "UNDERSTUDY_HOST": "host",
        "UNDERSTUDY_PORT": "port",
        "UNDERSTUDY_DATA_DIR": "data_dir",
        "UNDERSTUDY_ADAPTERS_DIR": "adapters_dir",
        "UNDERSTUDY_ADMIN_KEY": "admin_key",
        "UNDERSTUDY_DATABASE_URL": "database_url",
        "UNDERSTUDY_REDIS_URL": "redis_url",
    }
    for var, key in simple.items():
        if environ.get(var):
            overrides[key] = environ[var]
    upstream: dict[str, Any] = {}
    if environ.get("UNDERSTUDY_UPSTREAM_BASE_URL"):
        upstream["base_url"] = environ["UNDERSTUDY_UPSTREAM_BASE_URL"]
    api_key = environ.get("UNDERSTUDY_UPSTREAM_API_KEY") or environ.get("OPENAI_API_KEY")
    if api_key:
        upstream["api_key"] = api_key
    if upstream:
        overrides["upstream"] = upstream
    local: dict[str, Any] = {}
    if environ.get("UNDERSTUDY_LOCAL"):
        local["enabled"] = _parse_switch("UNDERSTUDY_LOCAL", environ["UNDERSTUDY_LOCAL"])
    if environ.get("UNDERSTUDY_LOCAL_BASE_URL"):  # one external backend (or vLLM) for every replica
        local["base_url"] = environ["UNDERSTUDY_LOCAL_BASE_URL"]
    if local:
        overrides["local"] = local
    return overrides


def _parse_switch(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("on", "1", "true", "yes"):
        return True
    if lowered in ("off", "0", "false", "no"):
        return False
    raise ConfigError(f"{name}: expected on or off, got {value!r}")


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """What is wrong with the YAML, never quoting interpolated text: the parser's message
    quotes the lines around the error, which may hold a `${SECRET}`'s value."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as raw_exc:
        return f"{path}: invalid YAML: {raw_exc}"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{path}: invalid YAML{where} once ${{VAR}} values are substituted (quote the value)"


def _read_yaml(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(interpolate(text, environ)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(path, text, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{where}: {message}")
    return f"invalid configuration in {source}: " + "; ".join(lines)


def config_path(explicit: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: the explicit one, UNDERSTUDY_CONFIG, or ./gateway.yaml if present."""
    if explicit:
        return Path(explicit)
    if environ.get("UNDERSTUDY_CONFIG"):
        return Path(environ["UNDERSTUDY_CONFIG"])
    default = Path("gateway.yaml")
    return default if default.is_file() else None


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings: defaults < YAML file < environment < explicit keyword overrides."""
    env = os.environ if environ is None else environ
    source = config_path(path, env)
    data = _read_yaml(source, env) if source else {}
    data = _merge(data, _env_overrides(env))
    data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(source or "environment"))) from None
