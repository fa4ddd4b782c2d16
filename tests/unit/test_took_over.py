"""``lease.took_over`` on MemoryBackend, where a manual clock reaches an interleaving the
conformance suite (tests/conformance/test_took_over.py, every backend) cannot order: a late
release that hands the key to a waiter before the waiter's own step. Failed before the flag
existed (AttributeError)."""

from __future__ import annotations

import asyncio

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
