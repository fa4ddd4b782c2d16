"""``lease.took_over`` on MemoryBackend: true exactly when the grant followed a lease that
expired (its holder died or froze), false when it followed a release or a free key. Each of
these failed before the flag existed (AttributeError)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from keylock import KeyedLock, LeaseLost
from keylock.backends import MemoryBackend


class ManualClock:
    """A clock the test steps by hand (the Clock protocol of keylock._clock)."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


def _locks() -> tuple[KeyedLock, ManualClock]:
    clock = ManualClock()
    return KeyedLock(MemoryBackend(clock=clock)), clock


async def test_a_free_key_and_a_released_one_are_not_taken_over() -> None:
    locks, _ = _locks()
    first = await locks.acquire("k", ttl=1)
    assert first.took_over is False
    waiter = asyncio.create_task(locks.acquire("k", ttl=1))
    await asyncio.sleep(0)  # queued
    await first.release()
    second = await waiter
    assert second.took_over is False  # handed over by a release
    await second.release()
    async with locks("k") as plain:  # the uncontended path
        assert plain.took_over is False


@pytest.mark.parametrize("ttl", [None, 1.0])
async def test_a_new_caller_after_an_expired_lease_took_it_over(ttl: float | None) -> None:
    """The expired branch of the step, both on the plain hot path (no TTL) and the other."""
    locks, clock = _locks()
    dead = await locks.acquire("k", ttl=1)  # its holder dies: never released
    clock.mono += 2
    async with locks("k", ttl=ttl) as lease:
        assert lease.took_over is True
        assert lease.token > dead.token
    async with locks("k", ttl=ttl) as after:  # released cleanly: the next one did not
        assert after.took_over is False


async def test_a_queued_waiter_that_takes_over_at_expiry_knows_it() -> None:
    """The waiter wakes at the holder's deadline and takes the key over."""
    locks, clock = _locks()
    frozen = await locks.acquire("k", ttl=1)
    waiter = asyncio.create_task(locks.acquire("k", ttl=1))
    await asyncio.sleep(0)  # queued
    clock.mono += 2
    lease = await asyncio.wait_for(waiter, 5)  # woken by its retry time, re-reads the clock
    assert lease.took_over is True
    await lease.extend(5)
    assert lease.took_over is True  # extend keeps it
    with pytest.raises(LeaseLost):
        await frozen.release()
    await lease.release()


async def test_a_late_release_of_an_expired_lease_hands_over_a_takeover() -> None:
    """The holder froze past its TTL, then released (LeaseLost): the waiter it hands the key
    to took it over from an expired lease, not a released one."""
    locks, clock = _locks()
    frozen = await locks.acquire("k", ttl=1)
    waiter = asyncio.create_task(locks.acquire("k", ttl=1))
    await asyncio.sleep(0)  # queued
    clock.mono += 2
    with pytest.raises(LeaseLost):
        frozen.release_sync()  # before the waiter's own step: the release hands the key on
    lease = await waiter
    assert lease.took_over is True
    await lease.release()


def test_a_thread_waiter_takes_over_too() -> None:
    locks, clock = _locks()
    frozen = locks.acquire_sync("k", ttl=1)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(locks.acquire_sync("k").took_over))
    thread.start()
    for _ in range(5000):  # bounded: at most 5 s for the thread to queue
        if locks.statistics("k").waiting:
            break
        thread.join(0.001)
    clock.mono += 2
    with pytest.raises(LeaseLost):
        frozen.release_sync()
    thread.join(5)
    assert got == [True]
