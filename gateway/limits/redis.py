"""Limits shared by every replica: the same buckets, kept in Redis as GCRA state and checked
and charged by one Lua script, so N gateways together admit the limit, not N times it.

Each bucket is one key holding its theoretical arrival time (TAT, ms): the moment it will
be empty. level = (TAT - now) x rate. The clock is Redis's own `TIME` (replicas' clocks may
disagree) unless one is injected (tests). If Redis cannot be reached the gateway keeps
serving on per-process limits (fail open, logged) rather than refusing everyone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.limits.clock import Clock
from gateway.limits.memory import MemoryLimiter
from gateway.limits.rates import Charge, Verdict

log = logging.getLogger("understudy.limits")

KEY_PREFIX = "understudy:rl:"
# How often the "Redis unreachable" warning may repeat.
WARN_EVERY_S = 30.0
# After a failure, Redis is left alone this long (so a dead one costs no timeout per request).
RETRY_REDIS_AFTER_S = 5.0

# KEYS: one per bucket. ARGV: mode ("acquire" | "adjust"), now in ms ("" = Redis TIME), then
# per bucket: ms per unit, capacity in units, amount.
# Returns {allowed, refused bucket (1-based, 0 = none), retry ms, level ms of each bucket...};
# numbers as strings, because Lua numbers would be truncated to integers on the way out.
GCRA_SCRIPT = """
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local n = #KEYS
local tats, news = {}, {}
local refused, retry = 0, 0
for i = 1, n do
  local at = 2 + (i - 1) * 3
  local per_unit, capacity, amount = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  news[i] = math.max(now, tat + amount * per_unit)
  if ARGV[1] == 'acquire' then
    local fitting = math.min(amount, capacity)
    local over = (tat - now) + (fitting - capacity) * per_unit
    if over > 1e-6 then
      if refused == 0 then refused = i end
      if over > retry then retry = over end
    end
  end
end
local out = {refused == 0 and '1' or '0', tostring(refused), string.format('%.3f', retry)}
for i = 1, n do
  local tat = tats[i]
  if refused == 0 then
    tat = news[i]
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  out[#out + 1] = string.format('%.3f', tat - now)
end
return out
"""


class RedisLimiter:
    def __init__(self, url: str, clock: Clock | None = None, fallback: MemoryLimiter | None = None):
        self.url = url
        self.clock = clock
        self.fallback = fallback or MemoryLimiter(clock)
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        self._script = self._redis.register_script(GCRA_SCRIPT)
        self._warned_at = -WARN_EVERY_S
        self._down_until = 0.0

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def close(self) -> None:
        await self._redis.aclose()

    async def acquire(self, charges: Sequence[Charge]) -> Verdict:
        if self._is_down():
            return await self.fallback.acquire(charges)
        try:
            reply = await self._run("acquire", charges)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return await self.fallback.acquire(charges)
        allowed, refused, retry_ms, *levels_ms = (float(part) for part in reply)
        quotas = tuple(
            c.rate.quota(level_ms / 1000 * c.rate.per_second)
            for c, level_ms in zip(charges, levels_ms, strict=True)
        )
        if allowed:
            return Verdict(True, quotas)
        return Verdict(
            False, quotas, retry_after_s=retry_ms / 1000, refused_by=charges[int(refused) - 1].rate
        )

    async def adjust(self, charges: Sequence[Charge]) -> None:
        if self._is_down():
            await self.fallback.adjust(charges)
            return
        try:
            await self._run("adjust", charges)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            await self.fallback.adjust(charges)

    async def _run(self, mode: str, charges: Sequence[Charge]) -> list[bytes]:
        now = "" if self.clock is None else f"{self.clock.time() * 1000:.3f}"
        args: list[str | float] = [mode, now]
        for charge in charges:
            args += [1000 / charge.rate.per_second, charge.rate.capacity, charge.amount]
        keys = [KEY_PREFIX + charge.rate.name for charge in charges]
        reply: list[bytes] = await self._script(keys=keys, args=args)
        return reply

    def _is_down(self) -> bool:
        return self._down_until > time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + RETRY_REDIS_AFTER_S
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("redis limits unavailable (%s); enforcing per-process limits", type(exc).__name__)
