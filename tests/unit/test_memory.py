"""MemoryBackend specifics: FIFO hand-off, expiry wake-ups, and no per-key state left behind."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest

from keylock import KeyedLock, Lease, LeaseLost, LockTimeout
from keylock.backends import MemoryBackend, memory


async def test_waiters_are_served_in_arrival_order() -> None:
    """FIFO: a releasing holder hands the key to the oldest waiter; nobody barges.

    A lock that lets a newcomer grab a just-released key (as a bare check-then-set does) breaks
    this order: the late task 'barger' below would run before the queued ones.
    """
    locks = KeyedLock()
    order: list[str] = []
    holder = await locks.acquire("fifo")

    async def waiter(name: str) -> None:
        async with locks("fifo"):
            order.append(name)
            await asyncio.sleep(0)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(waiter(f"w{i}")))
        await asyncio.sleep(0)  # each is queued before the next arrives
    await holder.release()
    tasks.append(asyncio.create_task(waiter("barger")))
    await asyncio.gather(*tasks)
    assert order == [f"w{i}" for i in range(10)] + ["barger"]


def test_thread_waiters_are_served_in_arrival_order() -> None:
    locks = KeyedLock()
    order: list[int] = []
    holder = locks.acquire_sync("fifo")
    threads = []
    for i in range(6):
        thread = threading.Thread(target=lambda i=i: _hold_and_record(locks, order, i))
        thread.start()
        threads.append(thread)
        while locks.statistics("fifo").waiting < i + 1:  # queued before the next starts
            time.sleep(0.001)
    holder.release_sync()
    for thread in threads:
        thread.join(10)
    assert order == list(range(6))


def _hold_and_record(locks: KeyedLock, order: list[int], i: int) -> None:
    with locks.sync("fifo"):
        order.append(i)


async def test_a_waiter_takes_over_when_the_holder_lease_expires() -> None:
    """Nobody releases: the queued waiter wakes at the holder's expiry, not at its timeout."""
    locks = KeyedLock()
    stuck = await locks.acquire("ttl", ttl=0.2)
    started = time.monotonic()
    lease = await locks.acquire("ttl", timeout=30)
    assert time.monotonic() - started < 29  # woke at the expiry, long before its own timeout
    assert lease.token > stuck.token
    assert stuck.lost
    with pytest.raises(LeaseLost):
        await stuck.release()
    await lease.release()
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_expiry_wake_up_is_passed_down_the_queue() -> None:
    """After a hand-off to a holder with a TTL, the next waiter is armed for that expiry."""
    locks = KeyedLock()
    first = await locks.acquire("chain")
    second_task = asyncio.create_task(locks.acquire("chain", ttl=0.15))
    third_task = asyncio.create_task(locks.acquire("chain", timeout=30))
    await asyncio.sleep(0.02)
    await first.release()  # hands to second (TTL 0.15), which never releases
    second = await second_task
    third = await third_task  # must wake at second's expiry
    assert second.lost
    assert third.token > second.token
    await third.release()


async def test_many_keys_churned_leave_nothing_behind() -> None:
    locks = KeyedLock()
    backend = locks.backend
    assert isinstance(backend, MemoryBackend)
    for i in range(2_000):  # warm up allocator pools
        async with locks(f"warm:{i}"):
            pass
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(200_000):
        async with locks(f"key:{i}"):
            pass
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    retained = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(backend) == 0
    assert retained < 1_000_000, retained


async def test_statistics_report_holder_and_queue() -> None:
    locks = KeyedLock(namespace="ns")
    assert not locks.statistics("s").held
    lease = await locks.acquire("s")
    task = asyncio.create_task(locks.acquire("s"))
    await asyncio.sleep(0)
    stats = locks.statistics("s")
    assert stats.held
    assert stats.token == lease.token
    assert stats.waiting == 1
    assert stats.key == "ns:s"
    await lease.release()
    await (await task).release()


class _Clock:
    """A clock this test moves: leases lapse exactly when it says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def test_lapsed_records_tell_the_next_holder_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lease released after it lapsed leaves a record (so the key's next holder learns it
    took over), which is not a held key and is never kept beyond MAX_LAPSED of them."""
    from keylock.backends import memory

    monkeypatch.setattr(memory, "MAX_LAPSED", 3)
    clock = _Clock()
    backend = MemoryBackend(clock=clock)
    locks = KeyedLock(backend)
    for n in range(5):
        lease = locks.acquire_sync(f"k{n}", ttl=1.0)
        clock.now += 2.0
        with pytest.raises(LeaseLost):
            lease.release_sync()
        assert len(backend) == 0  # nothing held
        assert not locks.statistics(f"k{n}").held
    assert len(backend._entries) <= 3  # the oldest were forgotten
    again = locks.acquire_sync("k4")
    assert again.took_over  # the latest lapse is still known
    again.release_sync()
    assert len(backend._entries) <= 3
    assert len(backend) == 0


class _Interleaved:
    """A token counter that runs *then* (once) just after its next number is drawn: a thread
    switch landing right after a mint, made deterministic."""

    def __init__(self, start: int) -> None:
        self.count = itertools.count(start)
        self.then: Callable[[], object] | None = None

    def __iter__(self) -> _Interleaved:
        return self

    def __next__(self) -> int:
        token = next(self.count)
        then, self.then = self.then, None
        if then is not None:
            then()
        return token


def _interleaved_backend(monkeypatch: pytest.MonkeyPatch) -> tuple[KeyedLock, _Interleaved]:
    counter = _Interleaved(1_000)
    monkeypatch.setattr(memory.itertools, "count", lambda start: counter)
    return KeyedLock(MemoryBackend()), counter


def test_a_claim_overtaken_before_its_insert_never_holds_an_older_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A free key is claimed without the mutex; its token is minted after the claim. Here a
    whole acquire+release of the key runs inside the first caller's mint: that caller must
    still hold the newer token (fails when the token is minted before the claim)."""
    locks, counter = _interleaved_backend(monkeypatch)
    tokens: list[int] = []

    def overtake() -> None:
        try:
            with locks.sync("k", timeout=0) as lease:
                tokens.append(lease.token)
        except LockTimeout:
            pass  # the first caller's claim came first: nothing overtook it

    counter.then = overtake
    with locks.sync("k") as lease:
        tokens.append(lease.token)
    assert tokens == sorted(tokens)


def test_the_mutex_side_never_overwrites_a_claim_of_a_free_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An acquire with a TTL takes the mutex, finds the key free and mints; a claim without
    the mutex lands in between. Exactly one of them holds the key (fails when the mutex side
    fills a free key by assignment instead of setdefault: both hold it)."""
    locks, counter = _interleaved_backend(monkeypatch)
    held: list[Lease] = []
    counter.then = lambda: held.append(locks.acquire_sync("k", timeout=0))
    with pytest.raises(LockTimeout):
        held.append(locks.acquire_sync("k", ttl=5, timeout=0))
    assert len(held) == 1
    assert locks.statistics("k").token == held[0].token
