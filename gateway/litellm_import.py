"""`understudy import-litellm`: a LiteLLM proxy `config.yaml` as an equivalent `gateway.yaml`.

What carries over (the README's "Coming from LiteLLM" has the table):
  model_list[].model_name          → a route matching that model name
  litellm_params.model             → the route's upstream (openai/, hosted_vllm/: OpenAI-compatible,
                                     forwarded byte for byte; any other provider: through litellm)
                                     and its upstream_model
  api_key, api_base, api_version   → that upstream's api_key, base_url, api_version
  os.environ/VAR                   → ${VAR}
  rpm, tpm, max_parallel_requests  → the route's limits
  timeout, max_retries             → the upstream's timeout_s, retry.attempts
  *_cost_per_token                 → pricing: (USD per million)
  num_retries, request_timeout     → every upstream's retry.attempts, timeout_s
  router_settings allowed_fails, cooldown_time → every upstream's breaker
  router_settings redis_*          → redis_url (limits shared by replicas)
  router_settings model_group_alias → more names in the target route's match
Everything else is reported by its path, never by its value (values may be secrets); keys
that cannot be carried (the master key, virtual keys stored as hashes) are listed to re-issue.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.errors import ConfigError
from gateway.settings import Settings, interpolate

ENV_REF = re.compile(r"^os\.environ/([A-Za-z_][A-Za-z0-9_]*)$")
# LiteLLM providers whose API is OpenAI's own: forwarded byte for byte on the fast path.
OPENAI_COMPATIBLE = frozenset({"openai", "hosted_vllm", "custom_openai", "text-completion-openai"})
OPENAI_BASE_URL = "https://api.openai.com/v1"
MAX_ATTEMPTS = 10  # Understudy's retry.attempts at most

WHY = {
    "fallbacks": "no cloud-to-cloud fallback: a route falls back to its own local model when "
    "its upstream fails (failover, once the route has passed eval)",
    "context_window_fallbacks": "no cloud-to-cloud fallback (see fallbacks)",
    "content_policy_fallbacks": "no cloud-to-cloud fallback (see fallbacks)",
    "drop_params": "OpenAI-compatible upstreams get the client's body as sent; litellm upstreams "
    "refuse parameters outside OpenAI's",
    "routing_strategy": "one upstream per model name: no load balancing",
    "database_url": "LiteLLM's database is its own schema: give Understudy a database of its own "
    "(database_url) or keep the default SQLite",
    "success_callback": "every pair is logged to Understudy's store; metrics on /metrics",
    "failure_callback": "errors are logged and counted on /metrics",
    "callbacks": "every pair is logged to Understudy's store; metrics on /metrics",
    "cache": "no response cache",
    "environment_variables": "set them in the gateway's environment; ${VAR} reads them",
}
DEPLOYMENT_PARAMS = frozenset(
    {"model", "api_key", "api_base", "api_version", "rpm", "tpm", "max_parallel_requests", "timeout"}
    | {"max_retries", "input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost"}
)
COST_KEYS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
}


@dataclass
class Report:
    """What did not carry over (path: why), and what must be issued anew."""

    dropped: list[str] = field(default_factory=list)
    reissue: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, path: str, why: str = "") -> None:
        self.dropped.append(f"{path}: {why or 'no equivalent in Understudy'}")

    def lines(self) -> list[str]:
        out = [f"not carried over: {line}" for line in self.dropped]
        out += [f"re-issue: {line}" for line in self.reissue]
        return out + [f"note: {line}" for line in self.notes]


@dataclass
class Imported:
    config: dict[str, Any]
    report: Report


def env_refs(value: Any) -> Any:
    """LiteLLM's `os.environ/VAR` as Understudy's `${VAR}`, anywhere in a value."""
    if isinstance(value, str):
        match = ENV_REF.match(value.strip())
        return f"${{{match.group(1)}}}" if match else value
    if isinstance(value, list):
        return [env_refs(item) for item in value]
    if isinstance(value, Mapping):
        return {key: env_refs(item) for key, item in value.items()}
    return value


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping")
    return dict(value)


@dataclass
class Globals:
    """Settings that apply to every upstream."""

    upstream: dict[str, Any] = field(default_factory=dict)
    redis_url: str | None = None
    aliases: dict[str, list[str]] = field(default_factory=dict)


def _attempts(retries: Any) -> int:
    return max(1, min(MAX_ATTEMPTS, int(retries) + 1))


def _litellm_settings(section: dict[str, Any], found: Globals, report: Report) -> None:
    if "num_retries" in section:
        found.upstream["retry"] = {"attempts": _attempts(section.pop("num_retries"))}
    if "request_timeout" in section:
        found.upstream["timeout_s"] = float(section.pop("request_timeout"))
    for key in section:
        report.drop(f"litellm_settings.{key}", WHY.get(key, ""))


def _redis_url(section: dict[str, Any]) -> str | None:
    if "redis_url" in section:
        return str(env_refs(section.pop("redis_url")))
    if "redis_host" not in section:
        return None
    host = env_refs(section.pop("redis_host"))
    port = env_refs(section.pop("redis_port", 6379))
    password = env_refs(section.pop("redis_password", None))
    return f"redis://{f':{password}@' if password else ''}{host}:{port}/0"


def _router_settings(section: dict[str, Any], found: Globals, report: Report) -> None:
    found.redis_url = _redis_url(section)
    if "num_retries" in section:
        found.upstream["retry"] = {"attempts": _attempts(section.pop("num_retries"))}
    if "timeout" in section:
        found.upstream["timeout_s"] = float(section.pop("timeout"))
    breaker: dict[str, float] = {}
    if "allowed_fails" in section:
        breaker["failure_threshold"] = max(1, int(section.pop("allowed_fails")))
    if "cooldown_time" in section:
        breaker["cooldown_s"] = float(section.pop("cooldown_time"))
    if breaker:
        found.upstream["breaker"] = breaker
    for alias, target in dict(section.pop("model_group_alias", None) or {}).items():
        name = target.get("model") if isinstance(target, Mapping) else target
        found.aliases.setdefault(str(name), []).append(str(alias))
    for key in section:
        report.drop(f"router_settings.{key}", WHY.get(key, ""))


def _general_settings(section: dict[str, Any], report: Report) -> None:
    if section.pop("master_key", None) is not None:
        report.reissue.append(
            "general_settings.master_key: the admin API takes admin_key (UNDERSTUDY_ADMIN_KEY); "
            "clients that used the master key need a key under auth.keys"
        )
    for key in section:
        report.drop(f"general_settings.{key}", WHY.get(key, ""))


@dataclass
class Deployment:
    """One model_list entry, read into what Understudy needs."""

    model_name: str
    upstream: dict[str, Any]
    upstream_model: str | None
    limits: dict[str, Any]
    price: dict[str, float]


def _provider(model: str) -> tuple[str, str] | None:
    """(provider, model without it): `azure/gpt-4o-eu` → (azure, gpt-4o-eu). A bare name is
    resolved by litellm the way LiteLLM's proxy does (`claude-haiku-4-5` → anthropic); None
    when litellm cannot place it either."""
    if "/" in model:
        provider, rest = model.split("/", 1)
        return provider, rest
    from gateway.upstream.litellm_provider import _import_litellm

    litellm = _import_litellm()
    litellm.suppress_debug_info = True
    try:
        return str(litellm.get_llm_provider(model)[1]), model
    except Exception:  # litellm raises its own tree for a name it cannot place
        return None


def _or_default(api_base: Any, default: str) -> str:
    """An unset os.environ/VAR api_base means the provider's own URL to LiteLLM: the same here."""
    if not api_base:
        return default
    value = str(api_base)
    return f"{value[:-1]}:-{default}}}" if value.startswith("${") and ":-" not in value else value


def _upstream(provider: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    upstream: dict[str, Any]
    if provider in OPENAI_COMPATIBLE:
        upstream = {"base_url": _or_default(params.get("api_base"), OPENAI_BASE_URL)}
    else:
        upstream = {"provider": "litellm", "model_prefix": f"{provider}/"}
        upstream["base_url"] = _or_default(params.get("api_base"), "")  # "": litellm's own
    upstream.update(copy.deepcopy(defaults))
    for ours, theirs in (("api_key", "api_key"), ("api_version", "api_version")):
        if params.get(theirs) is not None:
            upstream[ours] = str(params[theirs])
    if "timeout" in params:
        upstream["timeout_s"] = float(params["timeout"])
    if "max_retries" in params:
        upstream["retry"] = {"attempts": _attempts(params["max_retries"])}
    return upstream


def _deployment(index: int, entry: Any, defaults: dict[str, Any], report: Report) -> Deployment | None:
    where = f"model_list[{index}]"
    if not isinstance(entry, Mapping) or "model_name" not in entry:
        raise ConfigError(f"{where}: expected a mapping with model_name and litellm_params")
    params = env_refs(dict(entry.get("litellm_params") or {}))
    if not params.get("model"):
        raise ConfigError(f"{where}.litellm_params.model: missing")
    placed = _provider(str(params["model"]))
    if placed is None:
        report.drop(where, "litellm cannot tell its provider: write the model as provider/name")
        return None
    provider, rest = placed
    info = dict(entry.get("model_info") or {})
    limits = {key: int(params[key]) for key in ("rpm", "tpm") if key in params}
    if "max_parallel_requests" in params:
        limits["max_concurrency"] = int(params["max_parallel_requests"])
    costs = {**{k: v for k, v in params.items() if k in COST_KEYS}, **info}
    price = {COST_KEYS[k]: float(v) * 1e6 for k, v in costs.items() if k in COST_KEYS}
    for key in sorted(set(params) - DEPLOYMENT_PARAMS):
        report.drop(f"{where}.litellm_params.{key}", "per-request defaults are the client's to send")
    for key in sorted(set(info) - set(COST_KEYS)):
        report.drop(f"{where}.model_info.{key}")
    for key in sorted(set(entry) - {"model_name", "litellm_params", "model_info"}):
        report.drop(f"{where}.{key}")
    model = None if "*" in rest else rest
    upstream = _upstream(provider, params, defaults)
    return Deployment(str(entry["model_name"]), upstream, model, limits, price)


def _route_name(model_name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-._")[:60] or "model"
    base = "default-model" if base == "default" else base
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}-{counter}", counter + 1
    taken.add(name)
    return name


def _upstream_name(upstream: dict[str, Any], named: dict[str, dict[str, Any]]) -> str:
    for name, existing in named.items():
        if existing == upstream:
            return name
    prefix = str(upstream.get("model_prefix", "")).rstrip("/")
    base = prefix or ("openai" if upstream["base_url"] == OPENAI_BASE_URL else "openai-compatible")
    name, counter = base, 2
    while name in named or name == "default":
        name, counter = f"{base}-{counter}", counter + 1
    named[name] = upstream
    return name


def _build(deployments: list[Deployment], found: Globals, report: Report) -> dict[str, Any]:
    config: dict[str, Any] = {}
    upstreams: dict[str, dict[str, Any]] = {}
    routes: list[dict[str, Any]] = []
    pricing: dict[str, dict[str, float]] = {}
    seen: dict[str, int] = {}
    taken: set[str] = set()
    for index, deployment in enumerate(deployments):
        if deployment.model_name in seen:
            report.drop(
                f"model_list[{index}] (another deployment of {deployment.model_name!r})",
                f"one upstream per model name: model_list[{seen[deployment.model_name]}] is kept",
            )
            continue
        seen[deployment.model_name] = index
        if deployment.model_name == "*":
            config["upstream"] = deployment.upstream  # LiteLLM's catch-all: Understudy's default
            continue
        route: dict[str, Any] = {
            "name": _route_name(deployment.model_name, taken),
            "match": [deployment.model_name, *found.aliases.pop(deployment.model_name, [])],
            "upstream": _upstream_name(deployment.upstream, upstreams),
        }
        if deployment.upstream_model and deployment.upstream_model != deployment.model_name:
            route["upstream_model"] = deployment.upstream_model
        if deployment.limits:
            route["limits"] = deployment.limits
        if {"input", "output"} <= set(deployment.price):
            pricing[deployment.upstream_model or deployment.model_name] = deployment.price
        routes.append(route)
    for target in found.aliases:
        report.drop(f"router_settings.model_group_alias (to {target!r})", "no such model_name")
    if "upstream" not in config:
        report.notes.append(
            "a model not in model_list, which LiteLLM refuses, goes to the default upstream "
            "(upstream:, OpenAI with the client's own key)"
        )
    if found.redis_url:
        config["redis_url"] = found.redis_url
    config.update(upstreams=upstreams, routes=routes)
    if pricing:
        config["pricing"] = pricing
    return config


def import_litellm(litellm_config: Any) -> Imported:
    """Translate a parsed LiteLLM proxy config; ConfigError when it is not one."""
    if not isinstance(litellm_config, Mapping):
        raise ConfigError("the top level must be a mapping (model_list, litellm_settings, ...)")
    report = Report()
    found = Globals()
    _litellm_settings(env_refs(_section(litellm_config, "litellm_settings")), found, report)
    _router_settings(env_refs(_section(litellm_config, "router_settings")), found, report)
    _general_settings(_section(litellm_config, "general_settings"), report)
    if litellm_config.get("environment_variables"):
        report.drop("environment_variables", WHY["environment_variables"])
    known = {"model_list", "litellm_settings", "router_settings", "general_settings", "environment_variables"}
    for key in sorted(set(litellm_config) - known):
        report.drop(str(key))
    model_list = litellm_config.get("model_list") or []
    if not isinstance(model_list, list):
        raise ConfigError("model_list: expected a list")
    read = [_deployment(i, entry, found.upstream, report) for i, entry in enumerate(model_list)]
    deployments = [deployment for deployment in read if deployment is not None]
    report.reissue.append(
        "virtual keys: LiteLLM keeps them in its database as hashes, which Understudy cannot take "
        "over; issue new keys under auth.keys (key: ${VAR}), with their rpm/tpm as limits"
    )
    return Imported(_build(deployments, found, report), report)


HEADER = """\
# Written by `understudy import-litellm` from {source}.
# Routes proxy and log; set `adapt: true` on one to have it learned by the local model
# (needs the local and train extras: pip install 'understudy[all]').
"""


class _Dumper(yaml.SafeDumper):
    """Quotes every ${VAR}, so an unset variable reads as "" rather than as a missing value."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "'" if "${" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(imported: Imported, source: str) -> str:
    """The gateway.yaml text: a header, what was not carried over as comments, the settings."""
    notes = "".join(f"# {line}\n" for line in imported.report.lines())
    body = yaml.dump(imported.config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return HEADER.format(source=source) + notes + "\n" + body


class _EveryVariableSet(Mapping[str, str]):
    """An environment in which every ${VAR} is set, to check the file's shape."""

    def __getitem__(self, name: str) -> str:
        return name

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def check(text: str) -> None:
    """ConfigError when the written text would not load as Understudy's settings."""
    try:
        Settings.model_validate(yaml.safe_load(interpolate(text, _EveryVariableSet())))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"the translated config does not validate: {where}: {error['msg']}") from None


def convert_file(source: Path) -> tuple[str, Report]:
    """Read a LiteLLM config file and return the gateway.yaml text and the report."""
    try:
        parsed = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({type(exc).__name__})") from None
    try:
        imported = import_litellm(parsed)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a number that is not one (rpm: lots)
        raise ConfigError(f"{source}: {type(exc).__name__} while reading a value: {exc}"[:300]) from None
    text = render(imported, source.name)
    check(text)
    return text, imported.report
