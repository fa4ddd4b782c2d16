"""Mutual exclusion: at most one live lease per (namespace, key), across clients and flavours.

Each test counts holders inside the critical section with a yield point in the middle (the
read -> await -> write shape of every incident in DESIGN.md); without the lock the same workload
sees two holders at once within the first few iterations.
"""

from __future__ import annotations

import asyncio

import pytest

from keylock import KeyedLock, LockTimeout

from ..conftest import MakeBackend
from ._driver import Driver, SyncDriver


class _Section:
    """Counts holders; records the worst overlap and every token seen, in grant order."""

    def __init__(self) -> None:
        self.inside = 0
        self.max_inside = 0
        self.tokens: list[int] = []
        self.counter = 0

    async def run(self, token: int) -> None:
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        self.tokens.append(token)
        value = self.counter
        await asyncio.sleep(0)
        self.counter = value + 1
        self.inside -= 1


async def _contend(
    driver: Driver, clients: list[KeyedLock], section: _Section, rounds: int
) -> None:
    async def worker(locks: KeyedLock) -> None:
        for _ in range(rounds):
            lease = await driver.acquire(locks, "shared")
            try:
                await section.run(lease.token)
            finally:
                await driver.release(lease)

    await asyncio.gather(*(worker(locks) for locks in clients))


async def test_one_holder_at_a_time(make_backend: MakeBackend, driver: Driver) -> None:
    clients = [KeyedLock(make_backend(), namespace="ex") for _ in range(2)] * 4
    section = _Section()
    await _contend(driver, clients, section, rounds=15)
    assert section.max_inside == 1
    assert section.counter == 8 * 15  # no lost update
    assert section.tokens == sorted(section.tokens)
    assert len(set(section.tokens)) == len(section.tokens)


async def test_async_and_sync_callers_exclude_each_other(make_backend: MakeBackend) -> None:
    backend = make_backend()
    clients = [KeyedLock(backend, namespace="mix"), KeyedLock(make_backend(), namespace="mix")]
    section = _Section()

    async def run(driver: Driver, locks: KeyedLock) -> None:
        await _contend(driver, [locks], section, rounds=15)

    await asyncio.gather(
        run(Driver(), clients[0]),
        run(SyncDriver(), clients[0]),
        run(Driver(), clients[1]),
        run(SyncDriver(), clients[1]),
    )
    assert section.max_inside == 1
    assert section.counter == 4 * 15


async def test_distinct_keys_do_not_block_each_other(
    make_backend: MakeBackend, driver: Driver
) -> None:
    locks = KeyedLock(make_backend())
    first = await driver.acquire(locks, "a")
    second = await driver.acquire(locks, "b", timeout=0)  # would raise LockTimeout if coupled
    assert first.key == "a"
    assert second.key == "b"
    await driver.release(second)
    await driver.release(first)


async def test_namespaces_are_separate_and_shared(
    make_backend: MakeBackend, driver: Driver
) -> None:
    app_a = KeyedLock(make_backend(), namespace="app-a")
    app_b = KeyedLock(make_backend(), namespace="app-b")
    app_a_again = KeyedLock(make_backend(), namespace="app-a")
    lease = await driver.acquire(app_a, "job:1")
    other = await driver.acquire(app_b, "job:1", timeout=0)  # another namespace: free
    with pytest.raises(LockTimeout) as info:  # the same namespace and key: not granted twice
        await driver.acquire(app_a_again, "job:1", timeout=0)
    assert info.value.key == "app-a:job:1"  # errors name the key as stored, with namespace
    await driver.release(other)
    await driver.release(lease)


async def test_context_manager_holds_for_the_block(make_backend: MakeBackend) -> None:
    locks = KeyedLock(make_backend())
    other = KeyedLock(make_backend())
    async with locks("block") as lease:
        assert not lease.lost
        assert lease.key == "block"
        with pytest.raises(LockTimeout):  # not granted while the block holds the key
            await other.acquire("block", timeout=0)
    assert lease.released
    again = await other.acquire("block", timeout=0)
    await again.release()

    def blocking() -> None:
        with locks.sync("block") as held:
            assert held.token > lease.token

    await asyncio.to_thread(blocking)


async def test_namespace_and_key_pairs_never_share_a_lock(
    make_backend: MakeBackend, driver: Driver
) -> None:
    """Row 22 (adv_02): ("tenant:admin", "job"), ("tenant", "admin:job") and
    ("", "tenant:admin:job") were one lock on every backend (the namespace was joined to the
    key with ':'); each pair must be its own lock."""
    pairs = [("tenant:admin", "job"), ("tenant", "admin:job"), ("", "tenant:admin:job")]
    leases = []
    for namespace, key in pairs:
        locks = KeyedLock(make_backend(), namespace=namespace)
        leases.append(await driver.acquire(locks, key, timeout=0))  # free: not the same lock
    assert len({lease.token for lease in leases}) == len(pairs)
    for lease in leases:
        await driver.release(lease)
