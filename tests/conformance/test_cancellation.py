"""Cancellation: a waiter cancelled while waiting leaves nothing behind, even when the grant
raced the cancel. (Async only: threads cannot be cancelled.)

A naive "pop the waiter's future and hope" hand-off leaks the key exactly in the race case:
the grant goes to a task that is already cancelled and nobody ever releases it.
"""

from __future__ import annotations

import asyncio
import random

from keylock import KeyedLock

from ..conftest import MakeBackend
from ._driver import until_waiting


async def test_cancelled_waiter_leaves_no_trace(make_backend: MakeBackend) -> None:
    locks = KeyedLock(make_backend())
    holder = await locks.acquire("c")
    other = KeyedLock(make_backend())
    waiter = asyncio.create_task(other.acquire("c"))
    await until_waiting(other, "c")
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    await holder.release()
    lease = await locks.acquire("c", timeout=0)  # nobody else holds it
    await lease.release()
    assert locks.statistics("c").waiting == 0


async def test_cancel_racing_the_hand_off_passes_the_lock_on(make_backend: MakeBackend) -> None:
    locks = KeyedLock(make_backend())
    for _ in range(5):
        holder = await locks.acquire("race")
        other = KeyedLock(make_backend())
        racer = asyncio.create_task(other.acquire("race"))
        await until_waiting(other, "race")
        await holder.release()  # hands the key to racer (or lets it win its next step) ...
        racer.cancel()  # ... which is cancelled before it can run
        results = await asyncio.gather(racer, return_exceptions=True)
        if not isinstance(results[0], asyncio.CancelledError):
            await results[0].release()  # the grant beat the cancel: it is a normal lease
        lease = await locks.acquire("race", timeout=5)  # never stranded
        await lease.release()


async def test_cancellation_storm_keeps_exclusion_and_frees_the_key(
    make_backend: MakeBackend,
) -> None:
    rng = random.Random(7)
    clients = [KeyedLock(make_backend(), namespace="storm") for _ in range(2)]
    inside = 0
    worst = 0
    completed = 0

    async def worker(locks: KeyedLock) -> None:
        nonlocal inside, worst, completed
        async with locks("hot"):
            inside += 1
            worst = max(worst, inside)
            try:
                await asyncio.sleep(0.001)
            finally:  # a holder may be cancelled here too: it leaves the section
                inside -= 1
            completed += 1

    tasks = [asyncio.create_task(worker(clients[i % 2])) for i in range(40)]
    for task in rng.sample(tasks, 20):
        await asyncio.sleep(rng.random() * 0.004)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert worst == 1
    assert completed >= 1
    lease = await clients[0].acquire("hot", timeout=5)
    await lease.release()
    stats = clients[0].statistics("hot")
    assert not stats.held
    assert stats.waiting == 0
