"""What this install can run: `pip install understudy` is the gateway alone (a proxy that logs,
limits and meters); the extras add the rest:

    understudy[local]  the local model server, and the `embedding` judge
    understudy[train]  the LoRA trainer, for routes with `adapt: true`
    understudy[demo]   `understudy demo` (local + train + the openai SDK)
    understudy[all]    everything

A configuration that needs a missing extra fails at start with one line naming it. The one
exception is the built-in default `local.enabled` (never written in the config or the
environment): on a gateway-only install it means "off", so a bare `understudy serve` is a proxy.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

from gateway.errors import ConfigError
from gateway.settings import Settings

log = logging.getLogger(__name__)

# The modules each extra brings that the code imports (checked without importing them).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "local": ("torch", "transformers", "peft", "gguf", "outlines", "outlines_core"),
    "train": ("torch", "transformers", "peft", "datasets", "accelerate"),
    "demo": ("torch", "transformers", "peft", "datasets", "outlines", "openai"),
}

Available = Callable[[str], bool]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing(extra: str, available: Available = installed) -> list[str]:
    """The modules of `extra` this install lacks (empty: the extra is there)."""
    return [module for module in EXTRA_MODULES[extra] if not available(module)]


def install_hint(extra: str) -> str:
    return f"pip install 'understudy[{extra}]'"


def require(extra: str, what: str, available: Available = installed, otherwise: str = "") -> None:
    """Raise ConfigError, one line naming the extra, when `what` cannot run on this install."""
    absent = missing(extra, available)
    if absent:
        raise ConfigError(
            f"{what} needs the {extra} extra: {install_hint(extra)} (missing: {', '.join(absent)})"
            + (f"; {otherwise}" if otherwise else "")
        )


def fit_to_install(settings: Settings, available: Available = installed) -> Settings:
    """The settings to serve with on this install: unchanged, or the local model turned off
    when only the built-in default asked for it; ConfigError when the config needs an extra."""
    if settings.local.enabled:
        for route in settings.all_routes():
            if route.adapt:
                require("train", f"route {route.name!r} (adapt: true)", available)
            if route.adapt and route.policy.judge == "embedding":
                require("local", f"route {route.name!r} (judge: embedding)", available)
    if not settings.manages_local_backend or not missing("local", available):
        return settings
    if "enabled" in settings.local.model_fields_set or any(r.adapt for r in settings.all_routes()):
        proxy_only = "or set local.enabled: false (UNDERSTUDY_LOCAL=off) to serve as a proxy only"
        require("local", "local.enabled", available, proxy_only)
    log.warning(
        "local model off: this is a gateway-only install (%s adds it); serving as a proxy",
        install_hint("local"),
    )
    return settings.model_copy(update={"local": settings.local.model_copy(update={"enabled": False})})
