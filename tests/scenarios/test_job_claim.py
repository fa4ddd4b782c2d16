"""Incident 4, double job claim: N claimers read the job's revision, check it is unclaimed,
then write their claim. Without a lock several pass the check (the naive runs below show it);
under keylock exactly one wins, with asyncio tasks, OS threads, and two event loops at once."""

from __future__ import annotations

import asyncio
import threading
import time

from keylock import KeyedLock

CLAIMERS = 24


class Job:
    def __init__(self) -> None:
        self.revision = 0
        self.owner: str | None = None
        self.winners: list[str] = []

    async def claim(self, who: str) -> None:
        free = self.owner is None  # read + decide ...
        await asyncio.sleep(0.001)  # ... a round trip to the store ...
        if free:
            self._write(who)  # ... write, on what was read before the hop

    def claim_sync(self, who: str) -> None:
        free = self.owner is None
        time.sleep(0.001)
        if free:
            self._write(who)

    def _write(self, who: str) -> None:
        self.owner = who
        self.revision += 1
        self.winners.append(who)


async def test_naive_claim_has_several_winners() -> None:
    job = Job()
    await asyncio.gather(*(job.claim(f"t{i}") for i in range(CLAIMERS)))
    assert len(job.winners) > 1


async def test_tasks_claim_exactly_once() -> None:
    job = Job()
    locks = KeyedLock()

    async def claimer(i: int) -> None:
        async with locks("job:7"):
            await job.claim(f"t{i}")

    await asyncio.gather(*(claimer(i) for i in range(CLAIMERS)))
    assert len(job.winners) == 1


def _threads(target: object, count: int) -> None:
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        target(i)  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_naive_threads_have_several_winners() -> None:
    job = Job()
    _threads(lambda i: job.claim_sync(f"th{i}"), CLAIMERS)
    assert len(job.winners) > 1


def test_threads_claim_exactly_once() -> None:
    job = Job()
    locks = KeyedLock()

    def claimer(i: int) -> None:
        with locks.sync("job:7"):
            job.claim_sync(f"th{i}")

    _threads(claimer, CLAIMERS)
    assert len(job.winners) == 1


def test_two_event_loops_and_threads_claim_exactly_once() -> None:
    """Two loops in two threads plus plain threads, one KeyedLock: one winner."""
    job = Job()
    locks = KeyedLock()

    def loop_claimers(name: str) -> None:
        async def main() -> None:
            async def one(i: int) -> None:
                async with locks("job:7"):
                    await job.claim(f"{name}{i}")

            await asyncio.gather(*(one(i) for i in range(8)))

        asyncio.run(main())

    def sync_claimer(i: int) -> None:
        with locks.sync("job:7"):
            job.claim_sync(f"s{i}")

    threads = [
        threading.Thread(target=loop_claimers, args=("loopA",)),
        threading.Thread(target=loop_claimers, args=("loopB",)),
        *(threading.Thread(target=sync_claimer, args=(i,)) for i in range(8)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(job.winners) == 1
    assert len(locks.backend) == 0  # type: ignore[arg-type]
