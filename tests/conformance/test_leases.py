"""Leases: a TTL bounds a hold; an expired lease is taken over, its holder learns it was lost,
and release/extend of a lost lease raise LeaseLost. Only the holder can release or extend."""

from __future__ import annotations

import asyncio
import time

import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout

from ..conftest import MakeBackend
from ._driver import Driver

TTL = 0.3


async def test_expired_lease_is_taken_over_with_a_higher_token(
    make_backend: MakeBackend, driver: Driver
) -> None:
    old_locks = KeyedLock(make_backend(auto_renew=False))
    new_locks = KeyedLock(make_backend(auto_renew=False))
    old = await driver.acquire(old_locks, "lease", ttl=TTL)
    assert old.expires_at is not None
    assert old.expires_at <= time.time() + TTL + 0.05
    assert not old.lost
    new = await driver.acquire(new_locks, "lease", timeout=10, ttl=TTL * 10)
    assert new.token > old.token
    assert old.lost
    with pytest.raises(LeaseLost) as info:
        await driver.release(old)  # the holder must learn its section was not protected
    assert info.value.key is not None
    assert info.value.key.endswith("lease")
    # the stale holder's release did not free the new holder's lease
    with pytest.raises(LockTimeout):
        await driver.acquire(old_locks, "lease", timeout=0)
    await driver.release(new)


async def test_release_after_expiry_raises_even_if_nobody_took_over(
    make_backend: MakeBackend, driver: Driver
) -> None:
    locks = KeyedLock(make_backend(auto_renew=False))
    lease = await driver.acquire(locks, "lapsed", ttl=0.1)
    await asyncio.sleep(0.25)
    assert lease.lost
    with pytest.raises(LeaseLost):
        await driver.release(lease)
    again = await driver.acquire(locks, "lapsed", timeout=0)  # nothing left locked
    await driver.release(again)


async def test_extend_keeps_the_lease_alive(make_backend: MakeBackend, driver: Driver) -> None:
    locks = KeyedLock(make_backend(auto_renew=False))
    other = KeyedLock(make_backend(auto_renew=False))
    lease = await driver.acquire(locks, "extended", ttl=TTL)
    first_expiry = lease.expires_at
    await driver.extend(lease, 5.0)
    assert lease.expires_at is not None
    assert first_expiry is not None
    assert lease.expires_at > first_expiry
    await asyncio.sleep(TTL + 0.1)  # past the original TTL
    assert not lease.lost
    with pytest.raises(LockTimeout):
        await driver.acquire(other, "extended", timeout=0)
    await driver.release(lease)


async def test_extend_of_a_lost_lease_raises(make_backend: MakeBackend, driver: Driver) -> None:
    locks = KeyedLock(make_backend(auto_renew=False))
    lease = await driver.acquire(locks, "gone", ttl=0.1)
    taker = await driver.acquire(KeyedLock(make_backend()), "gone", timeout=10, ttl=10)
    with pytest.raises(LeaseLost):
        await driver.extend(lease, 5.0)
    assert lease.lost
    await driver.release(taker)


async def test_double_release_is_a_usage_error(make_backend: MakeBackend, driver: Driver) -> None:
    locks = KeyedLock(make_backend())
    lease = await driver.acquire(locks, "twice")
    await driver.release(lease)
    successor = await driver.acquire(locks, "twice")
    with pytest.raises(RuntimeError):
        await driver.release(lease)
    # the second release did not free the successor's lease
    with pytest.raises(LockTimeout):
        await driver.acquire(KeyedLock(make_backend()), "twice", timeout=0)
    await driver.release(successor)


async def test_a_forged_owner_cannot_release(make_backend: MakeBackend) -> None:
    locks = KeyedLock(make_backend(), namespace="own")
    lease = await locks.acquire("mine")
    intruder = make_backend()
    with pytest.raises(LeaseLost):
        intruder.release_sync("own:mine", b"\x01" * 16, lease.token)
    with pytest.raises(LeaseLost):
        intruder.extend_sync("own:mine", b"\x01" * 16, lease.token, 10.0)
    with pytest.raises(LockTimeout):
        await KeyedLock(make_backend(), namespace="own").acquire("mine", timeout=0)
    await lease.release()
