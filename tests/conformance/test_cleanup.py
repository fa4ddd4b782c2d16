"""Per-key state exists only while a key is held or awaited: churn, timeouts and
cancellations leave nothing behind."""

from __future__ import annotations

import asyncio

from keylock import KeyedLock, LockTimeout

from ..conftest import MakeBackend
from ._driver import Driver, until_waiting


async def test_churned_keys_leave_no_state(make_backend: MakeBackend, driver: Driver) -> None:
    locks = KeyedLock(make_backend(), namespace="churn")
    keys = [f"key:{i}" for i in range(40)]
    for key in keys:
        lease = await driver.acquire(locks, key)
        await driver.release(lease)
    for key in keys:
        stats = locks.statistics(key)
        assert not stats.held
        assert stats.waiting == 0


async def test_timeouts_and_cancellations_leave_no_waiters(make_backend: MakeBackend) -> None:
    locks = KeyedLock(make_backend(), namespace="left")
    holder = await locks.acquire("k")
    other = KeyedLock(make_backend(), namespace="left")
    cancelled = [asyncio.create_task(other.acquire("k")) for _ in range(5)]
    await until_waiting(other, "k", 5)  # queued before they are cancelled
    timed_out = [
        asyncio.create_task(KeyedLock(make_backend(), namespace="left").acquire("k", timeout=0.05))
        for _ in range(5)
    ]
    for task in cancelled:
        task.cancel()
    results = await asyncio.gather(*timed_out, *cancelled, return_exceptions=True)
    assert all(isinstance(r, LockTimeout) for r in results[:5])
    assert all(isinstance(r, asyncio.CancelledError) for r in results[5:])
    assert locks.statistics("k").waiting == 0
    await holder.release()
    stats = locks.statistics("k")
    assert not stats.held
    assert stats.waiting == 0
