"""Timeouts: None waits forever, 0 tries once, > 0 waits that long; then LockTimeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from keylock import KeyedLock, LockTimeout

from ..conftest import MakeBackend
from ._driver import Driver, until_waiting


async def test_zero_timeout_tries_once(make_backend: MakeBackend, driver: Driver) -> None:
    locks = KeyedLock(make_backend())
    holder = await driver.acquire(locks, "busy")
    with pytest.raises(LockTimeout) as info:
        await driver.acquire(KeyedLock(make_backend()), "busy", timeout=0)
    assert isinstance(info.value, TimeoutError)
    assert info.value.key is not None
    assert info.value.key.endswith("busy")
    assert "busy" in str(info.value)
    await driver.release(holder)
    lease = await driver.acquire(locks, "busy", timeout=0)  # free again: one try succeeds
    await driver.release(lease)


async def test_positive_timeout_waits_then_raises(
    make_backend: MakeBackend, driver: Driver
) -> None:
    locks = KeyedLock(make_backend())
    holder = await driver.acquire(locks, "slow")
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        await driver.acquire(KeyedLock(make_backend()), "slow", timeout=0.2)
    assert time.monotonic() - started >= 0.19  # it did wait (no upper bound asserted)
    await driver.release(holder)
    # the timed-out waiter left nothing behind: the key is free now
    after = await driver.acquire(locks, "slow", timeout=0)
    await driver.release(after)
    stats = locks.statistics("slow")
    assert not stats.held
    assert stats.waiting == 0


async def test_waiter_is_granted_when_released_before_deadline(
    make_backend: MakeBackend, driver: Driver
) -> None:
    locks = KeyedLock(make_backend())
    holder = await driver.acquire(locks, "handoff")
    other = KeyedLock(make_backend())
    waiter = asyncio.ensure_future(driver.acquire(other, "handoff", timeout=10))
    await until_waiting(other, "handoff")
    assert not waiter.done()
    await driver.release(holder)
    lease = await waiter
    assert lease.token > holder.token
    await driver.release(lease)


async def test_none_waits_until_free(make_backend: MakeBackend, driver: Driver) -> None:
    locks = KeyedLock(make_backend())
    holder = await driver.acquire(locks, "forever")
    other = KeyedLock(make_backend())
    waiter = asyncio.ensure_future(driver.acquire(other, "forever"))
    await until_waiting(other, "forever")
    assert not waiter.done()
    await driver.release(holder)
    lease = await asyncio.wait_for(waiter, 10)
    await driver.release(lease)
