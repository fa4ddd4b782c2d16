"""Incident 4, the double job claim.

N = 24 workers want job 7. Each reads the job (its revision and owner), checks it is
unclaimed, makes a round trip (the hop), and writes its claim: owner and revision + 1.

How it fails without keylock: every claimer reads the unclaimed revision 0 before any of them
writes, every one passes the check, and all 24 write: 24 winners, the job run 24 times. The
naive runs below use the same claimers under the same harnesses and are asserted to go wrong:
asyncio tasks (the hop yields, so the loop's FIFO scheduling lets all read first), OS threads
(the hop is a barrier every claimer reaches after its read), and two event loops in two threads
(each loop alone already has several winners). Under one ``KeyedLock`` exactly one claimer
wins, with tasks, threads, two loops, and all of them at once; the key is held by the test
until every claimer is queued, so they truly contend, and a section counter shows no two
claimers were ever inside at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from keylock import KeyedLock, Lease

CLAIMERS = 24
KEY = "job:7"


class Job:
    """The job's row: revision and owner; records every claim written (thread-safe)."""

    def __init__(self) -> None:
        self.revision = 0
        self.owner: str | None = None
        self.winners: list[str] = []
        self._mutex = threading.Lock()  # the store's own atomicity, per statement
        self.inside = 0
        self.worst = 0

    def read(self) -> tuple[int, str | None]:
        with self._mutex:
            self.inside += 1
            self.worst = max(self.worst, self.inside)
            return self.revision, self.owner

    def write(self, who: str, seen_revision: int) -> None:
        with self._mutex:
            self.revision = seen_revision + 1
            self.owner = who
            self.winners.append(who)

    def done(self) -> None:
        with self._mutex:
            self.inside -= 1

    async def claim(self, who: str) -> None:
        revision, owner = self.read()
        await asyncio.sleep(0)  # the round trip
        if owner is None:
            self.write(who, revision)
        self.done()

    def claim_sync(self, who: str, hop: Callable[[], object]) -> None:
        revision, owner = self.read()
        hop()
        if owner is None:
            self.write(who, revision)
        self.done()


# ------------------------------------------------------------------------------ harnesses


async def run_tasks(job: Job, locks: KeyedLock | None, count: int, name: str = "t") -> None:
    async def claimer(i: int) -> None:
        if locks is None:
            await job.claim(f"{name}{i}")
        else:
            async with locks(KEY):
                await job.claim(f"{name}{i}")

    await asyncio.gather(*(claimer(i) for i in range(count)))


def run_threads(
    job: Job, locks: KeyedLock | None, count: int, hop: Callable[[], object]
) -> list[threading.Thread]:
    """Start *count* claimer threads; the caller joins them."""

    def claimer(i: int) -> None:
        if locks is None:
            job.claim_sync(f"th{i}", hop)
        else:
            with locks.sync(KEY):
                job.claim_sync(f"th{i}", hop)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def run_loops(
    job: Job, locks: KeyedLock | None, loops: int, per_loop: int
) -> list[threading.Thread]:
    """Start *loops* threads, each running an event loop with *per_loop* claimer tasks."""
    threads = [
        threading.Thread(target=asyncio.run, args=(run_tasks(job, locks, per_loop, f"loop{n}-"),))
        for n in range(loops)
    ]
    for thread in threads:
        thread.start()
    return threads


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)


def release_when_queued(locks: KeyedLock, gate: Lease, count: int) -> None:
    """Open the job's key, held by the test, once *count* claimers wait for it."""
    deadline = time.monotonic() + 20
    while locks.statistics(KEY).waiting < count:
        assert time.monotonic() < deadline, locks.statistics(KEY)
        time.sleep(0.001)
    gate.release_sync()


def assert_one_winner(job: Job, locks: KeyedLock) -> None:
    assert len(job.winners) == 1, job.winners
    assert job.revision == 1
    assert job.owner == job.winners[0]
    assert job.worst == 1  # never two claimers between read and write
    assert len(locks.backend) == 0  # type: ignore[arg-type]


# ------------------------------------------------------------------------ without keylock


async def test_naive_tasks_all_win() -> None:
    job = Job()
    await run_tasks(job, None, CLAIMERS)
    assert len(job.winners) == CLAIMERS  # the bug: every claimer passed the check
    assert job.worst == CLAIMERS


def test_naive_threads_all_win() -> None:
    job = Job()
    everyone_read = threading.Barrier(CLAIMERS, timeout=10)  # forces the interleaving
    join(run_threads(job, None, CLAIMERS, everyone_read.wait))
    assert len(job.winners) == CLAIMERS


def test_naive_two_loops_have_several_winners() -> None:
    job = Job()
    join(run_loops(job, None, loops=2, per_loop=CLAIMERS // 2))
    # the loop that writes first read before any write: all its claimers win
    assert len(job.winners) >= CLAIMERS // 2


# --------------------------------------------------------------------------- with keylock


async def test_tasks_claim_exactly_once() -> None:
    job = Job()
    locks = KeyedLock()
    gate = await locks.acquire(KEY)
    claimers = asyncio.create_task(run_tasks(job, locks, CLAIMERS))
    while locks.statistics(KEY).waiting < CLAIMERS:
        await asyncio.sleep(0)
    await gate.release()
    await claimers
    assert_one_winner(job, locks)


def test_threads_claim_exactly_once() -> None:
    job = Job()
    locks = KeyedLock()
    gate = locks.acquire_sync(KEY)  # opened once every claimer is queued
    threads = run_threads(job, locks, CLAIMERS, lambda: time.sleep(0.0005))
    release_when_queued(locks, gate, CLAIMERS)
    join(threads)
    assert_one_winner(job, locks)


def test_two_event_loops_claim_exactly_once() -> None:
    job = Job()
    locks = KeyedLock()
    gate = locks.acquire_sync(KEY)  # opened once every claimer is queued
    threads = run_loops(job, locks, loops=2, per_loop=CLAIMERS // 2)
    release_when_queued(locks, gate, CLAIMERS)
    join(threads)
    assert_one_winner(job, locks)


async def test_tasks_threads_and_two_loops_at_once_claim_exactly_once() -> None:
    """Tasks on this loop, 8 threads, and two more loops with 8 tasks each: 32 claimers."""
    job = Job()
    locks = KeyedLock()
    gate = await locks.acquire(KEY)
    threads = run_threads(job, locks, 8, lambda: time.sleep(0.0005))
    threads += run_loops(job, locks, loops=2, per_loop=8)
    tasks = asyncio.create_task(run_tasks(job, locks, 8))
    while locks.statistics(KEY).waiting < 32:
        await asyncio.sleep(0.001)
    await gate.release()
    await tasks
    await asyncio.to_thread(join, threads)
    assert_one_winner(job, locks)


def test_repeated_rounds_each_have_one_winner() -> None:
    """Many rounds with threads and no gate: whatever the interleaving, one winner each."""
    locks = KeyedLock()
    for _ in range(20):
        job = Job()
        join(run_threads(job, locks, CLAIMERS, lambda: None))
        assert_one_winner(job, locks)
