"""In-process semaphores and RW locks: KeyedSemaphore against a bare asyncio.Semaphore and
threading.Semaphore, KeyedRWLock against aiorwlock, in one run.

Workloads: uncontended acquire+release (CPU us); a semaphore of limit 4 with 16 workers on one
key (tasks, threads); a 95% read / 5% write mix of 16 tasks on one key. A witness independent
of the lock under test counts violations (more than ``limit`` holders; a writer beside anyone).
Subjects are interleaved run by run; each figure is the median of the runs with its spread.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager

from .. import KeyedRWLock, KeyedSemaphore
from .harness import INSTALL, Row, Suite, cpu_clock, interleave, rotated
from .progress import Step

__all__ = ["steps"]

LIMIT = 4
WORKERS = 16
WRITES = 0.05  # of the RW mix's acquisitions

# A subject: mode ("read"/"write"/"") -> a context manager holding the one key
AsyncFor = Callable[[str], AbstractAsyncContextManager[object]]
SyncFor = Callable[[str], AbstractContextManager[object]]


def _peer_rwlock() -> Callable[[], AsyncFor] | None:
    try:
        import aiorwlock
    except ImportError:
        return None

    def make() -> AsyncFor:
        lock = aiorwlock.RWLock()
        # (aiorwlock's locks are async context managers without typing.AsyncContextManager)
        return lambda mode: lock.writer_lock if mode == "write" else lock.reader_lock  # type: ignore[return-value]

    return make


def steps(suite: Suite) -> list[Step]:
    """The permit workloads of *suite*'s mode; their rows go to *suite*."""
    repeats = 3 if suite.quick else 7
    seconds = 0.1 if suite.quick else 0.3
    scale = 0.25 if suite.quick else 1.0
    found = [
        Step(
            "in-process: uncontended semaphore acquire+release",
            6 * scale,
            lambda: _uncontended(suite, repeats),
        ),
        Step(
            f"in-process, tasks: semaphore limit {LIMIT}, {WORKERS} tasks",
            3 * repeats * (seconds + 0.05),
            lambda: _semaphore_tasks(suite, repeats, seconds),
        ),
        Step(
            f"in-process, tasks: 95% read / 5% write, {WORKERS} tasks",
            2 * repeats * (seconds + 0.05),
            lambda: _rw_mix(suite, repeats, seconds),
        ),
    ]
    if suite.headline:
        return found
    return [
        *found,
        Step(
            f"in-process, threads: semaphore limit {LIMIT}, {WORKERS} threads",
            2 * repeats * (seconds + 0.1),
            lambda: _semaphore_threads(suite, repeats, seconds),
        ),
    ]


def _uncontended(suite: Suite, repeats: int) -> None:
    """One loop, one key: CPU time of the thread per acquire+release."""
    n = 50_000 if suite.quick else 200_000
    workload = "uncontended async semaphore acquire+release"

    def timed(make: Callable[[], AsyncFor]) -> Callable[[], float]:
        def once() -> float:
            async def body() -> float:
                hold = make()
                start = cpu_clock()
                for _ in range(n):
                    async with hold("k"):
                        pass
                return (cpu_clock() - start) / n * 1e6

            return asyncio.run(body())

        return once

    def bare() -> AsyncFor:
        sem = asyncio.Semaphore(LIMIT)
        return lambda key: sem

    def keyed() -> AsyncFor:
        return KeyedSemaphore(limit=LIMIT)

    subjects = [
        ("asyncio.Semaphore (bare, one key)", bare),
        (f"keylock KeyedSemaphore(limit={LIMIT})", keyed),
    ]
    figures = interleave([(name, timed(make)) for name, make in subjects], repeats=repeats)
    for name, _ in subjects:
        suite.add(
            Row.of(workload, name, "CPU us", figures[name], baseline=subjects[0][0], family="")
        )


def _semaphore_tasks(suite: Suite, repeats: int, seconds: float) -> None:
    def bare() -> AsyncFor:
        sem = asyncio.Semaphore(LIMIT)
        return lambda mode: sem

    def keyed() -> AsyncFor:
        sem = KeyedSemaphore(limit=LIMIT)
        return lambda mode: sem("k")

    subjects = [
        ("asyncio.Semaphore (bare, one key)", bare),
        (f"keylock KeyedSemaphore(limit={LIMIT})", keyed),
    ]
    workload = f"in-process, tasks: semaphore limit {LIMIT}, one key, {WORKERS} tasks"
    _rows(suite, workload, subjects, repeats, lambda make: _run_tasks(make, seconds, 0.0))


def _rw_mix(suite: Suite, repeats: int, seconds: float) -> None:
    def keyed() -> AsyncFor:
        rw = KeyedRWLock()
        return lambda mode: rw.write("k") if mode == "write" else rw.read("k")

    peer = _peer_rwlock()
    subjects: list[tuple[str, Callable[[], AsyncFor] | None]] = [
        ("aiorwlock.RWLock (bare, one key)", peer),
        ("keylock KeyedRWLock()", keyed),
    ]
    workload = f"in-process, tasks: 95% read / 5% write, one key, {WORKERS} tasks"
    _rows(suite, workload, subjects, repeats, lambda make: _run_tasks(make, seconds, WRITES))


def _semaphore_threads(suite: Suite, repeats: int, seconds: float) -> None:
    def bare() -> SyncFor:
        sem = threading.Semaphore(LIMIT)
        return lambda mode: sem

    def keyed() -> SyncFor:
        sem = KeyedSemaphore(limit=LIMIT)
        return lambda mode: sem.sync("k")

    subjects = [
        ("threading.Semaphore (bare, one key)", bare),
        (f"keylock KeyedSemaphore(limit={LIMIT}).sync", keyed),
    ]
    workload = f"in-process, threads: semaphore limit {LIMIT}, one key, {WORKERS} threads"
    _rows(suite, workload, subjects, repeats, lambda make: _run_threads(make, seconds))


def _rows(
    suite: Suite,
    workload: str,
    subjects: Sequence[tuple[str, Callable[[], object] | None]],
    repeats: int,
    run: Callable[[Callable[[], object]], tuple[float, int]],
) -> None:
    present = [(name, make) for name, make in subjects if make is not None]
    for name, make in subjects:
        if make is None:
            suite.say(f"{workload} / {name}: not installed, skipped ({INSTALL})")
    figures: dict[str, list[float]] = {name: [] for name, _ in present}
    violations: dict[str, int] = {name: 0 for name, _ in present}
    for _, name, make in rotated(present, repeats):
        ops, bad = run(make)
        figures[name].append(ops)
        violations[name] += bad
    for name, _ in present:
        suite.add(
            Row.of(
                workload,
                name,
                "ops/s",
                figures[name],
                higher_is_better=True,
                extra={"violations": float(violations[name])},
                family=workload.partition(":")[0],
                workers=WORKERS,
            )
        )


class _Witness:
    """Holders by mode, counted by the workers themselves (one loop, or under a lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.readers = self.writers = 0
        self.violations = 0

    def enter(self, write: bool) -> None:
        if write:
            self.writers += 1
        else:
            self.readers += 1
        if (self.writers and self.readers + self.writers > 1) or self.readers > self.limit:
            self.violations += 1

    def leave(self, write: bool) -> None:
        if write:
            self.writers -= 1
        else:
            self.readers -= 1


def _run_tasks(make: Callable[[], object], seconds: float, writes: float) -> tuple[float, int]:
    """WORKERS tasks on one key until the deadline: (acquisitions per CPU second, violations).
    With *writes* > 0, that share of acquisitions are writes (fixed seed per worker)."""

    async def body() -> tuple[float, int]:
        hold: AsyncFor = make()  # type: ignore[assignment]
        witness = _Witness(LIMIT if not writes else WORKERS)
        done = 0
        deadline = time.monotonic() + seconds

        async def worker(me: int) -> None:
            nonlocal done
            rng = random.Random(me)
            while time.monotonic() < deadline:
                write = rng.random() < writes
                async with hold("write" if write else "read"):
                    witness.enter(write)
                    await asyncio.sleep(0)
                    witness.leave(write)
                done += 1

        cpu = cpu_clock()
        await asyncio.gather(*(worker(me) for me in range(WORKERS)))
        return done / max(cpu_clock() - cpu, 1e-9), witness.violations

    return asyncio.run(body())


def _run_threads(make: Callable[[], object], seconds: float) -> tuple[float, int]:
    """WORKERS threads on one key: (acquisitions per wall second, violations)."""
    hold: SyncFor = make()  # type: ignore[assignment]
    witness = _Witness(LIMIT)
    mutex = threading.Lock()
    counts = [0] * WORKERS
    deadline = time.monotonic() + seconds

    def worker(me: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            with hold(""):
                with mutex:
                    witness.enter(False)
                time.sleep(0)
                with mutex:
                    witness.leave(False)
            n += 1
        counts[me] = n

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(me,)) for me in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started), witness.violations
