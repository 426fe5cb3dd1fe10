"""Config models for client keys, limits and upstream resilience (part of `Settings`).

Kept apart from gateway/settings.py so that module stays readable; they follow its rules
(frozen, unknown keys refused).
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
# Seconds of a rate that may arrive at once, unless a limit sets `burst_s`.
DEFAULT_BURST_S = 10.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitSettings(_Strict):
    """Limits on a client key, a route, an upstream or the local backend. Unset = unlimited."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    # How much of the rate may arrive at once, in seconds of it (the bucket holds
    # rpm * burst_s / 60, at least 1): any 60 s window admits at most rpm * (1 + burst_s / 60).
    # The default, 10 s, lets an app spend a sixth of its minute at once (rpm 30: 5 parallel
    # requests), as users of OpenAI's and LiteLLM's per-minute limits expect.
    burst_s: float = Field(DEFAULT_BURST_S, gt=0, le=60)
    max_concurrency: int | None = Field(None, ge=1)
    # Requests waiting for a slot beyond max_concurrency; more (or a longer wait) → 503.
    max_queue: int = Field(100, ge=0)
    queue_timeout_s: float = Field(10.0, gt=0)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ClientKeySettings(_Strict):
    """A virtual key: `key_sha256` (hex), or `key: ${ENV}` which is hashed at load."""

    name: str = Field(pattern=KEY_NAME_PATTERN)
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    limits: LimitSettings = LimitSettings()

    @model_validator(mode="before")
    @classmethod
    def _hash_plain_key(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "key" not in data:
            return data
        data = dict(data)
        plain = data.pop("key")
        if "key_sha256" in data:
            raise ValueError("give either key or key_sha256, not both")
        if not isinstance(plain, str) or not plain:
            raise ValueError("key is empty (is the environment variable it names set?)")
        data["key_sha256"] = hash_key(plain)
        return data


class AuthSettings(_Strict):
    """Client keys. None configured: the gateway is open (the transparent default)."""

    keys: list[ClientKeySettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> AuthSettings:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("auth.keys: duplicate key names")
        if len({k.key_sha256 for k in self.keys}) != len(self.keys):
            raise ValueError("auth.keys: the same key is listed twice")
        return self


class RetrySettings(_Strict):
    """Retries of an upstream call, only before any byte reached the client."""

    attempts: int = Field(3, ge=1, le=10)
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(8.0, ge=0)
    # An upstream Retry-After longer than this is not waited for: the answer goes back as is.
    retry_after_cap_s: float = Field(20.0, ge=0)


class BreakerSettings(_Strict):
    """The circuit breaker in front of one upstream."""

    # Consecutive failed attempts (connection errors, timeouts, 5xx) that open the circuit.
    failure_threshold: int = Field(5, ge=1)
    # While open, calls fail fast with 503; after this one probe call is let through.
    cooldown_s: float = Field(30.0, gt=0)
