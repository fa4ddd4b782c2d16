"""Storms: cancellations at random instants during hand-offs, a crowd of waiters, many keys
held at once, single-flight callers cancelled at random. Nothing is lost, nothing stays
locked, no two holders overlap (checked by the history checker)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from keylock import KeyedLock, SingleFlight

from ..conftest import MakeBackend
from ._history import Grant, History, Verdict, Wait
from ._report import Report, scaled


async def _cancellation_storm(clients: list[KeyedLock], history: History, seed: int) -> int:
    """60 workers on *clients*, 30 of them cancelled at random instants; returns how many
    finished their section."""
    rng = random.Random(seed)
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        locks = clients[n % len(clients)]
        asked = time.monotonic()
        try:
            lease = await locks.acquire("key", timeout=30)
        except asyncio.CancelledError:
            history.waited(Wait("key", f"w{n}", asked, time.monotonic(), 30, "cancelled"))
            raise
        history.waited(Wait("key", f"w{n}", asked, time.monotonic(), 30, "granted"))
        grant = history.granted(
            Grant("key", lease.token, f"w{n}", time.monotonic(), None, asked_at=asked)
        )
        try:
            await asyncio.sleep(rng.random() * 0.002)
        finally:
            grant.released_at = time.monotonic()
            await lease.release()
        done += 1

    tasks = [asyncio.create_task(worker(n)) for n in range(60)]
    for task in rng.sample(tasks, 30):
        await asyncio.sleep(rng.random() * 0.003)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert done + sum(t.cancelled() for t in tasks) == 60  # nobody timed out: nothing leaked
    return done


async def test_cancellation_storm_during_hand_offs(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report
) -> None:
    """Waiters (and holders) cancelled at random instants, some right as the key is handed to
    them: no overlap, and the key is never stranded (a cancelled waiter that was handed the
    key passes it on; one that kept it would make the next acquire time out)."""
    history = History()
    clients = [KeyedLock(make_backend(), namespace="storm") for _ in range(3)]
    storms = scaled(1)
    for storm in range(storms):
        await _cancellation_storm(clients, history, seed=11 + storm)
        lease = await clients[0].acquire("key", timeout=5)  # never stranded
        await lease.release()
        stats = clients[0].statistics("key")
        assert (stats.held, stats.waiting) == (False, 0)
    verdict = history.check()
    chaos_report.record(
        "Cancellation storm during hand-offs",
        request.node.callspec.params["make_backend"],
        verdict,
        trials=storms,
        notes=f"{verdict.waits.get('cancelled', 0)} waiters cancelled",
    )
    assert verdict.ok, verdict


async def test_many_keys_held_at_once_then_released(chaos_report: Report) -> None:
    locks = KeyedLock()
    rounds = scaled(1)
    for _ in range(rounds):
        leases = [await locks.acquire(f"k:{i}") for i in range(100_000)]
        assert len(locks.backend) == 100_000  # type: ignore[arg-type]
        assert len({lease.token for lease in leases}) == 100_000
        for lease in leases:
            await lease.release()
        assert len(locks.backend) == 0  # type: ignore[arg-type]
    chaos_report.record(
        "100,000 keys held at once",
        "memory",
        Verdict(grants=100_000 * rounds),
        trials=rounds,
        notes="100,000 distinct tokens; no key left after",
    )


async def test_single_flight_callers_cancelled_at_random(chaos_report: Report) -> None:
    rng = random.Random(5)
    bursts = scaled(20)
    cancelled = 0
    flight = SingleFlight()
    runs = 0
    finished = 0

    async def work() -> str:
        nonlocal runs, finished
        runs += 1
        await asyncio.sleep(0.02)
        finished += 1
        return "value"

    for _ in range(bursts):
        callers = [asyncio.create_task(flight.do("k", work)) for _ in range(50)]
        await asyncio.sleep(0)
        doomed = rng.sample(callers, rng.randrange(0, 51))
        for task in doomed:
            cancelled += task.cancel()
        results = await asyncio.gather(*callers, return_exceptions=True)
        survivors = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        assert all(r == "value" for r in survivors)
        assert len(flight) == 0  # nothing left in flight
    chaos_report.record(
        "Single-flight callers cancelled at random",
        "memory, bursts of 50 callers",
        Verdict(grants=runs),
        trials=bursts,
        notes=f"{cancelled} callers cancelled; {runs} runs for {bursts} bursts, "
        f"{finished} finished (the rest cancelled with their last caller)",
    )
    assert runs == bursts  # one run per burst, cancelled or not
    assert finished <= runs
