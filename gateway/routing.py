"""Which route a request belongs to: the `X-Understudy-Route` header, else the first route
whose `match` patterns fit the request's `model` (exact or glob), else `default`."""

from __future__ import annotations

from gateway.errors import InvalidRequest
from gateway.settings import DEFAULT_ROUTE, RouteSettings

_CACHE_LIMIT = 4096
# Model names are short; a longer `model` (a client chooses it) is resolved but not kept.
CACHEABLE_NAME_LENGTH = 256


class RouteTable:
    def __init__(self, routes: list[RouteSettings]):
        self.routes = routes
        self.by_name = {route.name: route for route in routes}
        self.default = self.by_name[DEFAULT_ROUTE]
        # Resolving a model is a pattern scan; client model strings repeat, so cache them
        # (bounded: clients choose these strings).
        self._cache: dict[str, RouteSettings] = {}

    def resolve(self, model: str | None, forced: str | None = None) -> RouteSettings:
        if forced is not None:
            route = self.by_name.get(forced)
            if route is None:
                raise InvalidRequest(
                    f"unknown route {forced[:64]!r} in X-Understudy-Route", code="unknown_route"
                )
            return route
        if not model:
            return self.default
        route = self._cache.get(model)
        if route is None:
            route = next((r for r in self.routes if r.matches(model)), self.default)
            if len(model) <= CACHEABLE_NAME_LENGTH:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[model] = route
        return route
