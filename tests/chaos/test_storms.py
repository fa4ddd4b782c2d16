"""Storms: cancellations at random instants during hand-offs, a crowd of waiters, many keys
held at once, single-flight callers cancelled at random. Nothing is lost, nothing stays
locked, no two holders overlap (checked by the history checker)."""

from __future__ import annotations

import asyncio
import random
import time

from keylock import KeyedLock, SingleFlight

from ..conftest import MakeBackend
from ._history import Grant, History


async def test_cancellation_storm_during_hand_offs(make_backend: MakeBackend) -> None:
    """Waiters cancelled at random instants, some right as the key is handed to them."""
    rng = random.Random(11)
    history = History()
    clients = [KeyedLock(make_backend(), namespace="storm") for _ in range(3)]
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        locks = clients[n % len(clients)]
        async with locks("key", timeout=30) as lease:
            now = time.monotonic()
            grant = history.granted(Grant("key", lease.token, f"w{n}", now, None))
            try:
                await asyncio.sleep(rng.random() * 0.002)
            finally:
                grant.released_at = time.monotonic()
        done += 1

    tasks = [asyncio.create_task(worker(n)) for n in range(60)]
    cancelled = 0
    for task in rng.sample(tasks, 30):
        await asyncio.sleep(rng.random() * 0.003)
        cancelled += task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    verdict = history.check()
    assert verdict.ok, verdict
    assert done + sum(t.cancelled() for t in tasks) == 60  # nobody timed out: nothing leaked
    lease = await clients[0].acquire("key", timeout=5)  # never stranded
    await lease.release()
    stats = clients[0].statistics("key")
    assert (stats.held, stats.waiting) == (False, 0)


async def test_many_keys_held_at_once_then_released() -> None:
    locks = KeyedLock()
    leases = [await locks.acquire(f"k:{i}") for i in range(100_000)]
    assert len(locks.backend) == 100_000  # type: ignore[arg-type]
    assert len({lease.token for lease in leases}) == 100_000
    for lease in leases:
        await lease.release()
    assert len(locks.backend) == 0  # type: ignore[arg-type]


async def test_single_flight_callers_cancelled_at_random() -> None:
    rng = random.Random(5)
    flight = SingleFlight()
    runs = 0
    finished = 0

    async def work() -> str:
        nonlocal runs, finished
        runs += 1
        await asyncio.sleep(0.02)
        finished += 1
        return "value"

    for _ in range(20):
        callers = [asyncio.create_task(flight.do("k", work)) for _ in range(50)]
        await asyncio.sleep(0)
        doomed = rng.sample(callers, rng.randrange(0, 51))
        for task in doomed:
            task.cancel()
        results = await asyncio.gather(*callers, return_exceptions=True)
        survivors = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        assert all(r == "value" for r in survivors)
        assert len(flight) == 0  # nothing left in flight
    assert runs == 20  # one run per burst, cancelled or not
    assert finished <= runs
