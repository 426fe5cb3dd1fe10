"""What a request cost, from litellm's bundled price map (without importing litellm) and the
`pricing:` of gateway.yaml, which overrides or adds models (USD per million tokens).

litellm ships its model price map as a JSON file inside the package; reading that file is
offline and takes a few tens of milliseconds once, where `import litellm` takes seconds. The
map is keyed by model name; a price is looked up once per model string and cached (bounded,
since clients choose those strings).

`CostMeter` turns each answered request into `understudy_cost_usd_total{route,backend}`
(the cloud's price; local and failover answers cost 0) and
`understudy_cost_saved_usd_total{route}` (what the cloud would have charged for the tokens
the local model served, priced as the route's upstream model). Prompt tokens the upstream
served from its cache (`prompt_tokens_details.cached_tokens`, `input_tokens_details` for the
Responses API) are priced at the cached rate (`cache_read_input_token_cost`) when one is known.

Each priced answer is also one line of the persisted cost ledger (`ledger`, the log writer's
`add_cost`): kind `spend`, `savings` or `judge`, by route, client and day. The counters are
this process's; the ledger is every replica's since the store began.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.metrics import Metrics
from gateway.routing import CACHEABLE_NAME_LENGTH
from gateway.settings import PriceSettings, RouteSettings
from gateway.store.base import CostEntry

log = logging.getLogger("understudy.pricing")

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"
_CACHE_LIMIT = 1024
_PER_MILLION = 1e-6


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_per_token: float
    output_per_token: float
    # None: the upstream has no cached rate, cached prompt tokens cost the full input price.
    cached_input_per_token: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """`cached_tokens` are the part of `prompt_tokens` served from the upstream's cache."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_rate = (
            self.input_per_token if self.cached_input_per_token is None else self.cached_input_per_token
        )
        return (
            (prompt_tokens - cached) * self.input_per_token
            + cached * cached_rate
            + completion_tokens * self.output_per_token
        )

    @classmethod
    def per_million(cls, price: PriceSettings, fallback: ModelPrice | None) -> ModelPrice:
        """A configured price; an unset cached rate keeps the map's (same model) if any."""
        cached = price.cached_input
        if cached is not None:
            cached_per_token: float | None = cached * _PER_MILLION
        else:
            cached_per_token = fallback.cached_input_per_token if fallback else None
        return cls(price.input * _PER_MILLION, price.output * _PER_MILLION, cached_per_token)


def cached_tokens(usage: Any) -> int:
    """Prompt tokens served from the upstream's cache, per OpenAI's usage block (chat and
    completions: `prompt_tokens_details`; Responses: `input_tokens_details`)."""
    if not isinstance(usage, dict):
        return 0
    for key in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            return int(details["cached_tokens"])
    return 0


def bundled_price_map() -> Path | None:
    """litellm's bundled price map file, found without importing litellm (None if absent)."""
    spec = importlib.util.find_spec("litellm")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / PRICE_MAP_FILE
        if candidate.is_file():
            return candidate
    return None


def _price_of(entry: Any) -> ModelPrice | None:
    if not isinstance(entry, dict):
        return None
    prompt, completion = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if not isinstance(prompt, int | float) and not isinstance(completion, int | float):
        return None
    cached = entry.get("cache_read_input_token_cost")
    cached_rate = float(cached) if isinstance(cached, int | float) else None
    return ModelPrice(float(prompt or 0.0), float(completion or 0.0), cached_rate)


class PriceBook:
    """Per-token prices by model name. The file is read on first use, once."""

    def __init__(self, path: Path | None = None, overrides: Mapping[str, PriceSettings] | None = None):
        self._path = path
        self._overrides = dict(overrides or {})
        self._prices: dict[str, ModelPrice] | None = None
        self._resolved: dict[str, ModelPrice | None] = {}
        self._lock = threading.Lock()

    def load(self) -> dict[str, ModelPrice]:
        """The price table, reading the map file on the first call (safe from any thread)."""
        if self._prices is None:
            with self._lock:
                if self._prices is None:
                    self._prices = self._with_overrides(self._read())
        return self._prices

    def _read(self) -> dict[str, ModelPrice]:
        path = self._path or bundled_price_map()
        if path is None:
            log.warning("litellm's price map is not installed: costs are reported as 0")
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the price map %s (%s): costs are reported as 0", path, exc)
            return {}
        table = {name: price for name, entry in raw.items() if (price := _price_of(entry)) is not None}
        return table

    def _with_overrides(self, table: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        for name, price in self._overrides.items():
            table[name] = ModelPrice.per_million(price, table.get(name))
        return table

    def price(self, model: str | None) -> ModelPrice | None:
        """The price of `model`: exact name, else lower-cased, else without a provider prefix
        (`openai/gpt-4o-mini` → `gpt-4o-mini`). None when the map does not know it."""
        if not model:
            return None
        if model in self._resolved:
            return self._resolved[model]
        prices = self.load()
        found = next(
            (prices[name] for name in _candidates(model) if name in prices),
            None,
        )
        if len(model) > CACHEABLE_NAME_LENGTH:
            return found  # not a model name anyone prices: neither kept nor warned about each time
        if found is None:
            log.warning(
                "no price for model %r in litellm's price map or `pricing:`: its cost counts as 0", model[:80]
            )
        if len(self._resolved) >= _CACHE_LIMIT:
            self._resolved.clear()
        self._resolved[model] = found
        return found

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> float:
        price = self.price(model)
        return 0.0 if price is None else price.cost(prompt_tokens, completion_tokens, cached)


def _candidates(model: str) -> list[str]:
    names = [model, model.lower()]
    if "/" in model:
        names.append(model.rsplit("/", 1)[1])
        names.append(names[-1].lower())
    return names


class CostMeter:
    """Prices each answer into the cost metrics and the cost ledger. Labels are config route
    names and the fixed backend set, never client model strings."""

    def __init__(self, metrics: Metrics, prices: PriceBook):
        self.metrics = metrics
        self.prices = prices
        # Where ledger lines go (the log writer, which commits them off the request path).
        self.ledger: Callable[[CostEntry], None] = lambda entry: None

    def record(
        self,
        route: RouteSettings,
        backend: str,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int = 0,
        client: str | None = None,
        own_call: bool = False,
    ) -> float:
        """One answer: `model` is what the cloud was asked for (for a cloud answer); `client`
        the client key's name (or address), never its secret; `own_call` for the gateway's own
        calls (judging, spot checks). Returns what it cost in USD (0 for a local answer)."""
        prompt, completion = prompt_tokens or 0, completion_tokens or 0
        spent = self.metrics.cost.labels(route.name, backend)
        if backend == "cloud":
            cost = self.prices.cost(model, prompt, completion, cached_tokens)
            spent.inc(cost)
            self._enter(route.name, backend, "judge" if own_call else "spend", cost, client)
            return cost
        spent.inc(0)  # the local model costs no API money; keep the series visible
        saved = self.prices.cost(route.upstream_model or model, prompt, completion)
        self.metrics.cost_saved.labels(route.name).inc(saved)
        self._enter(route.name, backend, "savings", saved, client)
        return 0.0

    def _enter(self, route: str, backend: str, kind: str, usd: float, client: str | None) -> None:
        self.ledger(CostEntry(time.time(), route, backend, kind, usd, client))
