"""The layers in docs/ARCHITECTURE.md hold: every import points down. Lower packages never
import the edge (gateway/proxy, gateway/web), and the edge decides nothing about who answers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
EDGE = ("gateway.proxy", "gateway.web")
BELOW_THE_EDGE = ("upstream", "limits", "store", "adaptive", "domain", "local")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", BELOW_THE_EDGE)
def test_no_package_below_the_edge_imports_it(package: str) -> None:
    offenders = {
        str(path.relative_to(GATEWAY.parent)): sorted(m for m in _imports(path) if m.startswith(EDGE))
        for path in sorted((GATEWAY / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_proxy_edge_asks_the_dispatcher_and_never_the_controller() -> None:
    source = (GATEWAY / "proxy" / "handler.py").read_text(encoding="utf-8")
    for decision in ("controller", "serving(", "failover_adapter", "local_up", "local_upstream"):
        assert decision not in source, decision
    assert "dispatcher.plan(" in source and "dispatcher.send(" in source
