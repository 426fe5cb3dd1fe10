"""deploy/: the Grafana dashboard and the Prometheus alert rules name only metrics (and labels)
that a running gateway serves on /metrics, and the rules parse (promtool when installed, else
YAML plus an expression sanity check)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "understudy.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# A metric name, and the label matchers right after it if any.
SELECTOR = re.compile(r"\b(understudy_[a-z_]+)(\{[^}]*\})?")
MATCHER_LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Labels PromQL itself or Grafana add (not ones the gateway must serve).
IMPLICIT_LABELS = {"le"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


async def served_metrics(url: str) -> dict[str, Metric]:
    """Every sample name /metrics can serve (families without samples yet included), with
    its family."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    served: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            served[family.name + suffix] = family
    return served


def label_names(gateway: Any) -> dict[str, set[str]]:
    """Each family's label names, from the gateway's own collectors (a family without samples
    yet shows none on /metrics)."""
    names: dict[str, set[str]] = {}
    for value in vars(gateway.app.services.metrics).values():
        labels = getattr(value, "_labelnames", None)
        if labels is not None:
            names[value._name] = set(labels)
    return names


def balanced(expr: str) -> bool:
    depth: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            depth.append(char)
        elif char in pairs and (not depth or depth.pop() != pairs[char]):
            return False
    return not depth


def test_dashboard_covers_what_operators_watch() -> None:
    titles = " ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in ("backend", "p95", "first token", "mode", "score", "spend", "queue", "429", "log write"):
        assert topic in titles, topic


def test_alert_rules_parse_and_cover_the_failures() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == {
        "UnderstudyRouteDemoted",
        "UnderstudyEvalStuck",
        "UnderstudyLogWriteErrors",
        "UnderstudyLocalBackendDown",
        "UnderstudyCircuitOpen",
        "UnderstudyQueueSaturated",
    }
    for rule in rules:
        assert balanced(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: checked as YAML and by shape only")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_every_metric_and_label_named_exists_on_a_live_gateway(gateway: Any) -> None:
    served = await served_metrics(gateway.url)
    labels = label_names(gateway)
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    named = 0
    for expr in exprs:
        assert balanced(expr), expr
        for name, matchers in SELECTOR.findall(expr):
            named += 1
            assert name in served, f"{name} is not on /metrics"
            family = served[name].name
            known = labels.get(family, set()) | IMPLICIT_LABELS
            for label in MATCHER_LABEL.findall(matchers or ""):
                assert label in known, f"{name} has no label {label!r} (has {sorted(known)})"
    assert named > 30


# --- deploy/compose.yaml: two gateways, PostgreSQL, Redis, one local backend ----------------

COMPOSE = ROOT / "deploy" / "compose.yaml"
COMPOSE_VAR = re.compile(r"\$\{([A-Z_]+)(?::[-?][^}]*)?\}")


def compose_services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *gateway) resolved
    return dict(document["services"])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name."""
    return {entry.split(":")[1]: entry.split(":")[0] for entry in service.get("volumes", [])}


def test_compose_runs_two_gateways_on_one_database_redis_backend_and_adapters_volume(tmp_path: Path) -> None:
    from gateway.settings import load_settings

    services = compose_services()
    gateways = {
        name: s for name, s in services.items() if s.get("image") == "understudy" and "command" not in s
    }
    assert len(gateways) == 2
    assert services["db"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    backend = services["backend"]
    assert backend["command"][:2] == ["understudy", "backend"]
    backend_port = backend["command"][backend["command"].index("--port") + 1]
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    volumes: set[str] = set()
    for name, service in gateways.items():
        assert {"db", "redis", "backend"} <= set(service["depends_on"]), name
        # the environment as the container sees it (placeholders filled), read by the gateway
        env = {key: COMPOSE_VAR.sub("x", str(value)) for key, value in service["environment"].items()}
        settings = load_settings(config, environ=env)
        assert settings.database_url is not None and settings.database_url.startswith("postgresql://")
        assert "@db:5432/" in settings.database_url
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.local_base_url == f"http://backend:{backend_port}/v1"
        assert not settings.manages_local_backend  # the one backend, not one each
        adapters = str(settings.adapters_root)
        volumes.add(mounts(service)[adapters])
        assert mounts(backend)[adapters] == mounts(service)[adapters]  # the paths the backend is sent
        assert mounts(service)["/data"] != mounts(backend)["/data"]  # each replica its own data dir
    assert len(volumes) == 1  # one adapters volume for both
    data_volumes = {mounts(service)["/data"] for service in gateways.values()}
    assert len(data_volumes) == 2
    assert set(yaml.safe_load(COMPOSE.read_text())["volumes"]) >= volumes | data_volumes
