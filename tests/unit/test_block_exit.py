"""The end of a ``locks.sync(key)`` / ``locks(key)`` block on a MemoryBackend releases the
key without a call into the backend when the lease's record is its own and untimed
(``MemoryBackend.free_release``); every other case keeps release_sync's rules: a lease given
a TTL by extend and lapsed raises LeaseLost (and its key's next holder took it over), a
queued waiter gets the key at the exit, a block released inside raises RuntimeError."""

from __future__ import annotations

import threading
import time

import pytest

from keylock import KeyedLock, Lease, LeaseLost
from keylock.backends import MemoryBackend


class ManualClock:
    """A clock the test steps by hand (the Clock protocol of keylock._clock)."""

    def __init__(self) -> None:
        self.mono = 1000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.mono


def test_a_sync_block_whose_lease_got_a_ttl_and_lapsed_raises_lease_lost() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    locks = KeyedLock(backend)
    seen: list[Lease] = []

    def block() -> None:
        with locks.sync("k") as lease:
            seen.append(lease)
            lease.extend_sync(1)
            clock.mono += 2

    with pytest.raises(LeaseLost):
        block()
    assert seen[0].released
    assert seen[0].lost
    with locks.sync("k") as after:
        assert after.took_over
    assert len(backend) == 0


async def test_an_async_block_whose_lease_got_a_ttl_and_lapsed_raises_lease_lost() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    locks = KeyedLock(backend)

    async def block() -> None:
        async with locks("k") as lease:
            await lease.extend(1)
            clock.mono += 2

    with pytest.raises(LeaseLost):
        await block()
    async with locks("k") as after:
        assert after.took_over
    assert len(backend) == 0


def test_a_sync_block_exit_hands_the_key_to_the_queued_thread() -> None:
    locks = KeyedLock()
    got: list[int] = []
    with locks.sync("k") as first:
        waiter = threading.Thread(target=lambda: got.append(locks.acquire_sync("k").token))
        waiter.start()
        for _ in range(2000):  # bounded poll: until the waiter is queued
            if locks.statistics("k").waiting == 1:
                break
            time.sleep(0.005)
        assert locks.statistics("k").waiting == 1
    waiter.join(10)
    assert got == [locks.statistics("k").token]
    assert got[0] > first.token
    assert locks.statistics("k").waiting == 0


def test_a_sync_block_released_inside_raises_at_its_exit_and_frees_the_key() -> None:
    locks = KeyedLock()

    def block() -> None:
        with locks.sync("k") as lease:
            lease.release_sync()

    with pytest.raises(RuntimeError, match="already released"):
        block()
    assert not locks.statistics("k").held


async def test_an_async_block_released_inside_raises_at_its_exit() -> None:
    locks = KeyedLock()

    async def block() -> None:
        async with locks("k") as lease:
            await lease.release()

    with pytest.raises(RuntimeError, match="already released"):
        await block()
    assert not locks.statistics("k").held
