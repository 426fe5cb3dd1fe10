"""OpenAI's rate-limit headers, for the tightest limit that applied to a request:
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets written like OpenAI's
(`20ms`, `1.5s`, `6m0s`)."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.limits.rates import Quota, Unit

Header = tuple[bytes, bytes]
_PREFIX = b"x-ratelimit-"
_SUFFIX: dict[Unit, bytes] = {"requests": b"requests", "tokens": b"tokens"}


def format_reset(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


def tightest(quotas: Iterable[Quota]) -> dict[Unit, Quota]:
    """Per unit, the quota with the fewest units left (the smaller limit on a tie)."""
    best: dict[Unit, Quota] = {}
    for quota in quotas:
        current = best.get(quota.rate.unit)
        if current is None or (quota.remaining, quota.rate.per_minute) < (
            current.remaining,
            current.rate.per_minute,
        ):
            best[quota.rate.unit] = quota
    return best


def rate_limit_headers(quotas: Iterable[Quota]) -> list[Header]:
    headers: list[Header] = []
    for unit, quota in tightest(quotas).items():
        suffix = _SUFFIX[unit]
        headers += [
            (b"x-ratelimit-limit-" + suffix, str(quota.rate.per_minute).encode()),
            (b"x-ratelimit-remaining-" + suffix, str(quota.remaining).encode()),
            (b"x-ratelimit-reset-" + suffix, format_reset(quota.reset_s).encode()),
        ]
    return headers


def merge_rate_limit_headers(upstream: list[Header], ours: list[Header]) -> list[Header]:
    """The upstream's headers with ours added; where both report the same unit, the trio
    with fewer remaining wins (the upstream's own account limits may be the tighter ones)."""
    if not any(name.startswith(_PREFIX) for name, _ in upstream):
        return upstream + ours
    drop_ours: set[bytes] = set()
    drop_upstream: set[bytes] = set()
    for unit in (b"requests", b"tokens"):
        mine = _remaining(ours, unit)
        if mine is None:
            continue
        theirs = _remaining(upstream, unit)
        (drop_ours if theirs is not None and theirs < mine else drop_upstream).add(unit)
    kept = [h for h in upstream if not _is_trio_of(h[0], drop_upstream)]
    return kept + [h for h in ours if not _is_trio_of(h[0], drop_ours)]


def _remaining(headers: list[Header], unit: bytes) -> int | None:
    name = _PREFIX + b"remaining-" + unit
    for key, value in headers:
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _is_trio_of(name: bytes, units: set[bytes]) -> bool:
    return name.startswith(_PREFIX) and name.rsplit(b"-", 1)[-1] in units
