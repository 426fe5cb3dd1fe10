"""The fair pool on its own: round-robin hand-over, bounded queue, waits that end."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import Overloaded
from gateway.limits.pool import FairPool


async def test_freed_slots_go_round_robin_across_tenants() -> None:
    pool = FairPool("p", capacity=1, max_queue=10, queue_timeout_s=5)
    held = await pool.acquire("a")
    order: list[str] = []

    async def wait(tenant: str) -> None:
        taken = await pool.acquire(tenant)
        order.append(tenant)
        pool.release(taken)

    tasks = [asyncio.create_task(wait(t)) for t in ("a", "a", "a", "b", "c")]
    await asyncio.sleep(0)
    assert pool.depth == 5
    pool.release(held)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "a", "a"]
    assert pool.inflight == 0 and pool.depth == 0


async def test_full_queue_and_timeout_refuse_and_leave_no_trace() -> None:
    pool = FairPool("p", capacity=1, max_queue=1, queue_timeout_s=0.05)
    held = await pool.acquire("a")
    waiter = asyncio.create_task(pool.acquire("b"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="queue is full") as full:
        await pool.acquire("c")
    assert full.value.retry_after is not None and full.value.retry_after > 0
    with pytest.raises(Overloaded, match="no slot within"):
        await waiter
    assert pool.depth == 0
    pool.release(held)
    assert pool.inflight == 0


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    pool = FairPool("p", capacity=1, max_queue=5, queue_timeout_s=5)
    held = await pool.acquire("a")
    leaving = asyncio.create_task(pool.acquire("b"))
    staying = asyncio.create_task(pool.acquire("c"))
    await asyncio.sleep(0)
    leaving.cancel()
    pool.release(held)  # hand-over runs before the cancelled task cleans up after itself
    taken = await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert pool.inflight == 1 and pool.depth == 0
    pool.release(taken)
    assert pool.inflight == 0
