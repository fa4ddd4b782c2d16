"""Incident 1, batch status promotion.

A batch has three sub-jobs; two succeed and one fails, all at about the same time. Each
sub-job increments its own counter (``done`` or ``failed``), then reads the three counters
(``done``, ``failed``, ``total``) and writes the batch's status: ``running`` while some
sub-job is unfinished, else ``failed`` if any failed, else ``complete``. Every store access is
a round trip, and there is more work (an await) between the read and the write.

How it fails without keylock: a sub-job reads the counters before the others have finished
(``running``), is delayed before its write, and writes after the last sub-job wrote ``failed``:
the batch ends ``running`` with all three finished and ``failed=1``, a status that disagrees
with the failure count (and a batch that is never promoted). The test enumerates 729
interleavings (each sub-job yields 0-2 times before its increment and 0, 3 or 6 times between
its read and its write) under one harness: without a lock about one in six end wrong (133
on CPython 3.11); under the batch's ``KeyedLock`` every one ends ``failed``. The interleavings
come from the event loop's FIFO scheduling, so the naive failures are the same on every run.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable

from keylock import KeyedLock

PRE = (0, 1, 2)  # yields before the increment
MID = (0, 3, 6)  # yields between the read and the write
SUB_JOBS = (False, True, False)  # (failed?) for each sub-job
Schedule = tuple[tuple[int, int], ...]
SCHEDULES: list[Schedule] = list(itertools.product(itertools.product(PRE, MID), repeat=3))


async def _yields(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class Batch:
    """The store: three counters and a status; every access is a round trip."""

    def __init__(self) -> None:
        self.counters = {"done": 0, "failed": 0, "total": len(SUB_JOBS)}
        self.status = "running"

    async def incr(self, name: str) -> None:
        await asyncio.sleep(0)
        self.counters[name] += 1  # atomic in the store (an INCR)

    async def get(self, name: str) -> int:
        await asyncio.sleep(0)
        return self.counters[name]

    async def set_status(self, status: str) -> None:
        await asyncio.sleep(0)
        self.status = status

    def agrees(self) -> bool:
        counters = self.counters
        if counters["done"] + counters["failed"] < counters["total"]:
            return self.status == "running"
        return self.status == ("failed" if counters["failed"] else "complete")


def promote(done: int, failed: int, total: int) -> str:
    if done + failed < total:
        return "running"
    return "failed" if failed else "complete"


async def finish(batch: Batch, failed: bool, pre: int, mid: int) -> None:
    """One sub-job's ending, as written by hand: increment, read three counters, write."""
    await _yields(pre)
    await batch.incr("failed" if failed else "done")
    done = await batch.get("done")
    bad = await batch.get("failed")
    total = await batch.get("total")
    await _yields(mid)  # more work before the write
    await batch.set_status(promote(done, bad, total))


async def trial(schedule: Schedule, locks: KeyedLock | None) -> Batch:
    """The harness: the three sub-jobs end concurrently, with the given yields."""
    batch = Batch()

    async def sub_job(failed: bool, pre: int, mid: int) -> None:
        if locks is None:
            await finish(batch, failed, pre, mid)
        else:
            async with locks("batch:1"):
                await finish(batch, failed, pre, mid)

    await asyncio.gather(
        *(sub_job(failed, pre, mid) for failed, (pre, mid) in zip(SUB_JOBS, schedule, strict=True))
    )
    return batch


# the interface test_redis_incidents.py runs on other backends
async def _trial(locks: KeyedLock | None, seed: int) -> Batch:
    """One interleaving, picked by *seed*, of the harness above."""
    return await trial(random.Random(seed).choice(SCHEDULES), locks)


def _agrees(batch: Batch) -> bool:
    return batch.agrees()


async def test_naive_promotion_disagrees_with_the_failure_count() -> None:
    wrong = []
    for schedule in SCHEDULES:
        batch = await trial(schedule, None)
        assert batch.counters == {"done": 2, "failed": 1, "total": 3}
        if not batch.agrees():
            wrong.append((schedule, batch.status))
    assert wrong  # the bug, e.g. a stale "running" written after "failed"
    assert {status for _, status in wrong} == {"running"}
    # one interleaving, spelled out: the failing sub-job reads before the last success is
    # counted ("running"), and writes last, over the last success's "failed"
    batch = await trial(((0, 0), (0, 6), (2, 0)), None)
    assert (batch.status, batch.counters["failed"]) == ("running", 1)


async def test_locked_promotion_always_agrees() -> None:
    locks = KeyedLock()
    for schedule in SCHEDULES:
        batch = await trial(schedule, locks)
        assert batch.counters == {"done": 2, "failed": 1, "total": 3}
        assert batch.status == "failed", schedule
    assert len(locks.backend) == 0  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- threads


def thread_trial(locks: KeyedLock, rng: random.Random) -> tuple[dict[str, int], str]:
    """The same workload in three OS threads, with random pauses, under the sync lock."""
    counters = {"done": 0, "failed": 0, "total": 3}
    status = ["running"]
    pauses = [(rng.random() * 0.001, rng.random() * 0.001) for _ in SUB_JOBS]
    start = threading.Barrier(len(SUB_JOBS), timeout=10)

    def sub_job(failed: bool, pause: tuple[float, float]) -> None:
        start.wait()
        with locks.sync("batch:1"):
            time.sleep(pause[0])
            counters["failed" if failed else "done"] += 1
            read = (counters["done"], counters["failed"], counters["total"])
            time.sleep(pause[1])
            status[0] = promote(*read)

    _in_threads([lambda f=f, p=p: sub_job(f, p) for f, p in zip(SUB_JOBS, pauses, strict=True)])
    return counters, status[0]


def _in_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_locked_promotion_in_threads_always_agrees() -> None:
    locks = KeyedLock()
    rng = random.Random(7)
    for _ in range(40):
        counters, status = thread_trial(locks, rng)
        assert counters == {"done": 2, "failed": 1, "total": 3}
        assert status == "failed"
    assert len(locks.backend) == 0  # type: ignore[arg-type]
