"""Permits on every backend in PERMIT_BACKENDS, every shape (semaphores of limit 1 and 3, RW
readers and writers), both flavours: what a lock guarantees, per permit, with capacity.

Holder counts are taken inside the section with a yield point in the middle, as in
test_exclusion.py: a semaphore that admitted ``limit + 1``, or a reader beside a writer, is
seen within the first rounds (test_naive_fails.py shows the workload catching a naive lock).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from keylock import KeyedLock, Lease, LeaseLost, LimitMismatch, LockTimeout
from keylock.backends.base import RW_LIMIT

from ..conftest import MakeBackend, PermitClients
from ._driver import Driver, until_waiting

TTL = 0.3
HELD_TTL = 1.0


class _Counted:
    """Counts holders by mode; records the worst overlap and tokens in grant order."""

    def __init__(self) -> None:
        self.readers = self.writers = 0
        self.most = 0
        self.mixed = 0  # times a writer was inside with anyone else
        self.tokens: list[int] = []

    async def run(self, token: int, writer: bool) -> None:
        self.tokens.append(token)
        if writer:
            self.writers += 1
        else:
            self.readers += 1
        inside = self.readers + self.writers
        self.most = max(self.most, inside)
        if self.writers and inside > 1:
            self.mixed += 1
        await asyncio.sleep(0)
        if writer:
            self.writers -= 1
        else:
            self.readers -= 1


async def _fill(
    permits: PermitClients,
    driver: Driver,
    key: str,
    *,
    ttl: float | None = None,
    auto_renew: bool = True,
) -> list[Lease]:
    """Leases that fill *key* so that a request of the shape under test must wait."""
    count, (limit, weight) = permits.blocker
    locks = KeyedLock(permits.make_shape(limit, weight, auto_renew=auto_renew))
    return [await driver.acquire(locks, key, timeout=0, ttl=ttl) for _ in range(count)]


async def _release_all(driver: Driver, leases: list[Lease]) -> None:
    for lease in leases:
        await driver.release(lease)


async def test_never_more_than_the_limit(permits: PermitClients, driver: Driver) -> None:
    clients = [KeyedLock(permits.make(), namespace="cap") for _ in range(2)] * 4
    section = _Counted()

    async def worker(locks: KeyedLock) -> None:
        for _ in range(12):
            lease = await driver.acquire(locks, "shared", timeout=30)
            try:
                await section.run(lease.token, writer=permits.exclusive)
            finally:
                await driver.release(lease)

    await asyncio.gather(*(worker(locks) for locks in clients))
    assert 1 <= section.most <= min(permits.capacity, 8)
    if permits.exclusive:
        assert section.most == 1
    assert len(set(section.tokens)) == len(section.tokens) == 8 * 12


async def test_rw_never_a_reader_beside_a_writer(
    make_permit_client: MakeBackend, driver: Driver
) -> None:
    """Readers and writers of one key from two clients, both flavours: a writer is always
    alone."""
    make = make_permit_client
    read = [KeyedLock(make().permits(RW_LIMIT, 1), namespace="rw") for _ in range(2)]
    write = [KeyedLock(make().permits(RW_LIMIT, RW_LIMIT), namespace="rw") for _ in range(2)]
    section = _Counted()

    async def worker(locks: KeyedLock, writer: bool) -> None:
        for _ in range(10):
            lease = await driver.acquire(locks, "doc", timeout=30)
            try:
                await section.run(lease.token, writer)
            finally:
                await driver.release(lease)

    await asyncio.gather(
        *(worker(locks, False) for locks in read * 3), *(worker(locks, True) for locks in write)
    )
    assert section.mixed == 0
    assert section.most >= 1
    assert len(set(section.tokens)) == len(section.tokens)


async def test_a_full_key_times_out_and_leaves_nothing(
    permits: PermitClients, driver: Driver
) -> None:
    held = await _fill(permits, driver, "busy")
    locks = KeyedLock(permits.make())
    with pytest.raises(LockTimeout):
        await driver.acquire(locks, "busy", timeout=0)
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        await driver.acquire(locks, "busy", timeout=0.2)
    assert time.monotonic() - started >= 0.19
    assert locks.statistics("busy").waiting == 0
    await _release_all(driver, held)
    lease = await driver.acquire(locks, "busy", timeout=0)
    assert lease.token > max(h.token for h in held)
    await driver.release(lease)


async def test_a_waiter_is_granted_when_room_is_made(
    permits: PermitClients, driver: Driver
) -> None:
    held = await _fill(permits, driver, "room")
    locks = KeyedLock(permits.make())
    waiting = asyncio.ensure_future(driver.acquire(locks, "room", timeout=30))
    await until_waiting(locks, "room")
    await driver.release(held[0])
    lease = await waiting
    assert lease.token > max(h.token for h in held)
    await _release_all(driver, [*held[1:], lease])
    stats = locks.statistics("room")
    assert (stats.held, stats.waiting) == (False, 0)


async def test_a_cancelled_waiter_leaves_no_trace(permits: PermitClients) -> None:
    held = await _fill(permits, Driver(), "c")
    locks = KeyedLock(permits.make())
    for _ in range(3):
        waiter = asyncio.create_task(locks.acquire("c"))
        await until_waiting(locks, "c")
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert waiter.cancelled()
    assert locks.statistics("c").waiting == 0
    await _release_all(Driver(), held)
    lease = await locks.acquire("c", timeout=0)
    await lease.release()


async def test_cancel_racing_a_grant_passes_it_on(permits: PermitClients) -> None:
    locks = KeyedLock(permits.make())
    for _ in range(5):
        held = await _fill(permits, Driver(), "race")
        racer = asyncio.create_task(locks.acquire("race"))
        await until_waiting(locks, "race")
        await _release_all(Driver(), held)
        racer.cancel()
        results = await asyncio.gather(racer, return_exceptions=True)
        if not isinstance(results[0], asyncio.CancelledError):
            await results[0].release()
        lease = await locks.acquire("race", timeout=5)  # never stranded
        await lease.release()
    stats = locks.statistics("race")
    assert (stats.held, stats.waiting) == (False, 0)


async def test_tokens_rise_across_permits_and_clients(
    permits: PermitClients, driver: Driver
) -> None:
    clients = [KeyedLock(permits.make(), namespace="tok") for _ in range(3)]
    tokens = []
    for _ in range(3):
        for locks in clients:
            lease = await driver.acquire(locks, "k", timeout=10)
            tokens.append(lease.token)
            await driver.release(lease)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


async def test_an_expired_permit_is_taken_over(permits: PermitClients, driver: Driver) -> None:
    # held for HELD_TTL, not TTL: filling takes `limit` tries without waiting, and a grant
    # whose reply comes back after its TTL (a loaded machine) is refused, not returned
    held = await _fill(permits, driver, "lease", ttl=HELD_TTL, auto_renew=False)
    locks = KeyedLock(permits.make(auto_renew=False))
    lease = await driver.acquire(locks, "lease", timeout=10, ttl=TTL * 10)
    assert lease.took_over
    assert lease.token > max(h.token for h in held)
    with pytest.raises(LeaseLost):
        await driver.extend(held[0], 5.0)
    for old in held[1:]:
        deadline = time.monotonic() + 10
        while not old.lost:  # bounded poll: the first to lapse let us in, the others follow
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        with pytest.raises(LeaseLost):
            await driver.release(old)
    await driver.extend(lease, 30.0)
    await driver.release(lease)


async def test_a_released_permit_is_not_a_takeover(permits: PermitClients, driver: Driver) -> None:
    locks = KeyedLock(permits.make(auto_renew=False))
    first = await driver.acquire(locks, "clean", ttl=TTL * 10)
    await driver.release(first)
    second = await driver.acquire(locks, "clean", ttl=TTL * 10)
    assert not first.took_over
    assert not second.took_over
    await driver.release(second)


async def test_two_limits_on_one_key_are_refused(permits: PermitClients, driver: Driver) -> None:
    """Never limit + 1 holders: a client with another limit gets LimitMismatch while the key is
    held, and the key is its own again once nobody holds it."""
    mine = KeyedLock(permits.make(), namespace="lim")
    other = KeyedLock(permits.make_shape(7, 1), namespace="lim")
    lease = await driver.acquire(mine, "k", timeout=0)
    with pytest.raises(LimitMismatch) as raised:
        await driver.acquire(other, "k", timeout=0)
    assert raised.value.key == "lim:k"
    with pytest.raises(LimitMismatch):
        await driver.acquire(other, "k", timeout=0.1)
    await driver.release(lease)
    theirs = await driver.acquire(other, "k", timeout=0)
    with pytest.raises(LimitMismatch):
        await driver.acquire(mine, "k", timeout=0)
    await driver.release(theirs)


async def test_the_lock_and_permit_keyspaces_are_separate(permits: PermitClients) -> None:
    lock = KeyedLock(permits.make_client())
    permit = KeyedLock(permits.make())
    async with lock("same"):
        lease = await permit.acquire("same", timeout=0)
        await lease.release()


async def test_a_writer_waits_for_readers_and_blocks_later_ones(
    make_permit_client: MakeBackend, driver: Driver
) -> None:
    """FIFO across modes: a writer waiting behind readers gets the key as soon as they are
    done, before a reader that arrived after it."""
    read = KeyedLock(make_permit_client().permits(RW_LIMIT, 1), namespace="f")
    write = KeyedLock(make_permit_client().permits(RW_LIMIT, RW_LIMIT), namespace="f")
    first = await driver.acquire(read, "doc", timeout=0)
    writer = asyncio.ensure_future(driver.acquire(write, "doc", timeout=30))
    await until_waiting(write, "doc")
    with pytest.raises(LockTimeout):  # a later reader does not pass the waiting writer
        await driver.acquire(read, "doc", timeout=0)
    late = asyncio.ensure_future(driver.acquire(read, "doc", timeout=30))
    await until_waiting(read, "doc", 2)
    await driver.release(first)
    w = await writer
    assert not late.done()
    assert w.token > first.token
    await driver.release(w)
    r = await late
    assert r.token > w.token
    await driver.release(r)


async def test_churned_keys_leave_no_state(permits: PermitClients, driver: Driver) -> None:
    locks = KeyedLock(permits.make(), namespace="churn")
    for i in range(20):
        key = f"k{i}"
        lease = await driver.acquire(locks, key, timeout=1)
        await driver.release(lease)
        stats = locks.statistics(key)
        assert (stats.held, stats.waiting, stats.holders) == (False, 0, 0)
