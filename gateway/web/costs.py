"""The cost ledger as the admin API and the dashboard read it: spend and savings summed over
every replica's lines in the store, so the figures survive restarts (the Prometheus counters
are this process's, since it started)."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from typing import Any

from starlette.requests import Request

from gateway.errors import InvalidRequest
from gateway.services import Services
from gateway.store.base import COST_GROUPS
from gateway.web.common import query_time
from gateway.web.endpoints import Endpoint, Param
from gateway.web.schemas import CostList, CostTotal, RouteTotals

# Ledger kinds as RouteTotals names them. `cost_usd` is all the cloud was paid (the gateway's
# own calls included, as `understudy_cost_usd_total` counts them).
_SPENT = ("spend", "judge")
_GROUP = f"({'|'.join(COST_GROUPS)})"
_BY = re.compile(f"{_GROUP}(,{_GROUP})*")


def ledger_money(services: Services) -> dict[str, dict[str, float]]:
    """Per route: USD by ledger kind, from every replica. Blocking: call from a thread."""
    money: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in services.store.cost_totals(by=("route", "kind")):
        money[row["route"]][row["kind"]] += float(row["usd"] or 0.0)
    return money


def with_ledger(totals: RouteTotals, money: dict[str, float]) -> RouteTotals:
    """`totals` (this process's counters) with its money replaced by the ledger's sums."""
    spent = sum(money.get(kind, 0.0) for kind in _SPENT)
    saved, judge = money.get("savings", 0.0), money.get("judge", 0.0)
    return totals.model_copy(
        update={
            "cost_usd": round(spent, 6),
            "cost_saved_usd": round(saved, 6),
            "judge_cost_usd": round(judge, 6),
            "net_saved_usd": round(saved - judge, 6),
        }
    )


def _groups(request: Request) -> tuple[str, ...]:
    raw = request.query_params.get("by", "route,kind")
    groups = tuple(dict.fromkeys(part.strip() for part in raw.split(",")))
    if not _BY.fullmatch(raw) or not set(groups) <= set(COST_GROUPS):
        raise InvalidRequest(f"'by' must be comma-separated names among {', '.join(COST_GROUPS)}")
    return groups


async def get_costs(request: Request, services: Services) -> CostList:
    groups = _groups(request)
    route, since = request.query_params.get("route"), query_time(request, "since")
    rows: list[dict[str, Any]] = await asyncio.to_thread(services.store.cost_totals, groups, route, since)
    return CostList(
        data=[CostTotal.model_validate({**row, "usd": round(float(row["usd"] or 0), 9)}) for row in rows]
    )


endpoints = [
    Endpoint(
        "GET",
        "/admin/costs",
        get_costs,
        "The cost ledger summed over every replica: spend, savings and the gateway's own calls",
        CostList,
        params=(
            Param(
                "by",
                "query",
                {"type": "string", "pattern": f"^{_BY.pattern}$"},
                f"comma-separated groups among {', '.join(COST_GROUPS)} (default route,kind)",
            ),
            Param("route", "query", {"type": "string"}, "only this route"),
            Param("since", "query", {"type": "string", "format": "date-time"}, "at or after (ISO 8601)"),
        ),
        errors=(400,),
    ),
]
