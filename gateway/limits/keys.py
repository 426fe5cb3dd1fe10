"""Virtual client keys: known only by their SHA-256, each with a name and its own limits.

The key is read from `Authorization: Bearer ...` (what the openai SDK sends), or from
`api-key` / `x-api-key` (Azure- and Anthropic-style clients). The key itself is never
logged nor forwarded; the record carries the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import Unauthorized
from gateway.limits.settings import ClientKeySettings, LimitSettings, hash_key

_KEY_HEADERS = (b"authorization", b"api-key", b"x-api-key")


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    limits: LimitSettings


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name not in _KEY_HEADERS:
            continue
        text = value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, text = text.partition(" ")
            if scheme.lower() != "bearer":
                continue
            text = text.strip()
        if text:
            return text
    return None


class KeyTable:
    def __init__(self, keys: list[ClientKeySettings]):
        self._by_digest = {k.key_sha256: ClientKey(k.name, k.limits) for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> ClientKey:
        """The client key these headers present; Unauthorized (401) when missing or unknown."""
        presented = presented_key(headers)
        if presented is None:
            raise Unauthorized(
                "no API key provided: send it as 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        key = self._by_digest.get(hash_key(presented))
        if key is None:
            raise Unauthorized("incorrect API key provided", code="invalid_api_key")
        return key
