"""Fencing tokens: ints, strictly increasing per key over all grants by all clients."""

from __future__ import annotations

import asyncio
import itertools

from keylock import KeyedLock

from ..conftest import MakeBackend
from ._driver import Driver


async def test_tokens_strictly_increase_across_clients(
    make_backend: MakeBackend, driver: Driver
) -> None:
    clients = [KeyedLock(make_backend(), namespace="tok") for _ in range(3)]
    seen: list[int] = []
    for round_ in range(12):
        lease = await driver.acquire(clients[round_ % 3], "fenced")
        assert type(lease.token) is int
        seen.append(lease.token)
        await driver.release(lease)
    assert all(a < b for a, b in itertools.pairwise(seen)), seen


async def test_tokens_increase_in_grant_order_under_contention(
    make_backend: MakeBackend, driver: Driver
) -> None:
    clients = [KeyedLock(make_backend(), namespace="tok") for _ in range(2)] * 3
    in_order: list[int] = []

    async def worker(locks: KeyedLock) -> None:
        for _ in range(8):
            lease = await driver.acquire(locks, "contended")
            in_order.append(lease.token)  # appended while holding: this is grant order
            await asyncio.sleep(0)
            await driver.release(lease)

    await asyncio.gather(*(worker(locks) for locks in clients))
    assert len(in_order) == 48
    assert all(a < b for a, b in itertools.pairwise(in_order)), in_order


async def test_tokens_per_key_never_reused_after_release(
    make_backend: MakeBackend, driver: Driver
) -> None:
    locks = KeyedLock(make_backend())
    first = await driver.acquire(locks, "k1")
    await driver.release(first)
    other = await driver.acquire(locks, "k2")
    await driver.release(other)
    second = await driver.acquire(locks, "k1")  # its state was freed in between
    await driver.release(second)
    assert second.token > first.token
