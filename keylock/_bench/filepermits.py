"""A FileBackend semaphore across processes: limit 4, 16 processes on one key, against what
users hand-roll on one host (N portalocker lock files, one per slot, tried in turn, with a
sleep between rounds), in one run on the same directory; sections empty (the cost of the
permit itself), then of 1 ms (a real limit: at most 4,000 sections a second).

A witness independent of the locks (a counter in shared memory, under its own lock) counts
holders: more than ``limit`` at once is a violation. Figures: acquisitions per second, and the
99th percentile of the waits (a starved process shows there).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from typing import TYPE_CHECKING

from .. import KeyedSemaphore
from ..backends.file import FileBackend
from .contend import Run, SyncLockFor, Witness, run_processes
from .harness import MIN_RUNS, Row, Suite, rotated
from .progress import Step

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["steps"]

LIMIT = 4
PROCESSES = 16
FAMILY = "file, processes"
WORKLOAD = f"file semaphore limit {LIMIT}, one key, {PROCESSES} processes"
HOLDS = (0.0, 0.001)  # seconds inside each section


class _CountingWitness(Witness):
    """Holders of the one key counted in shared memory (create it before the workers fork);
    each holder stays *hold* seconds inside, counted."""

    def __init__(self, limit: int, hold: float = 0.0) -> None:
        ctx = multiprocessing.get_context("fork")
        self._limit, self._hold = limit, hold
        self._state = ctx.RawArray("i", 2)  # holders inside, the last holder
        self._mutex = ctx.Lock()

    def enter(self, key: int, me: int) -> tuple[bool, bool]:
        with self._mutex:
            self._state[0] += 1
            last, self._state[1] = self._state[1], me
            found = self._state[0] > self._limit, last not in (0, me)
        if self._hold:
            time.sleep(self._hold)  # the section (a vendor call)
        return found

    def leave(self, key: int, violated: bool) -> None:
        with self._mutex:
            self._state[0] -= 1


class _Slots:
    """The hand-rolled semaphore: LIMIT portalocker lock files; try each without waiting,
    starting at a different one per process, and sleep *poll* after a round with none free."""

    def __init__(self, directory: str, poll: float, me: int) -> None:
        import portalocker

        self._poll = poll
        self._busy = (portalocker.AlreadyLocked, portalocker.LockException)
        self._slots = [
            portalocker.Lock(os.path.join(directory, f"portalocker-slot-{i}.lock"), timeout=0)
            for i in range(LIMIT)
        ]
        self._first = me % LIMIT
        self._held: object = None

    def __enter__(self) -> None:
        order = self._slots[self._first :] + self._slots[: self._first]
        while True:
            for slot in order:
                try:
                    slot.acquire(timeout=0, fail_when_locked=True)
                except self._busy:
                    continue
                self._held = slot
                return
            time.sleep(self._poll)

    def __exit__(self, *exc: object) -> None:
        self._held.release()  # type: ignore[attr-defined]


def _keylock(directory: str) -> SyncLockFor:
    sem = KeyedSemaphore(FileBackend(directory), limit=LIMIT)
    return lambda key: sem.sync(f"k{key}")


def _portalocker_slots(poll: float) -> Callable[[str], SyncLockFor]:
    def make(directory: str) -> SyncLockFor:
        lock = _Slots(directory, poll, os.getpid())
        return lambda key: lock

    return make


SUBJECTS: list[tuple[str, Callable[[str], SyncLockFor]]] = [
    (f"keylock KeyedSemaphore(FileBackend, limit={LIMIT})", _keylock),
    (f"{LIMIT} portalocker slot files tried in turn (0.5 ms poll)", _portalocker_slots(0.0005)),
    (f"{LIMIT} portalocker slot files tried in turn (50 ms poll)", _portalocker_slots(0.05)),
]


def steps(suite: Suite, directory: str) -> list[Step]:
    """The file semaphore workload, in *directory* (the file suite's)."""
    seconds = 0.3 if suite.quick else 1.0
    repeats = 2 if suite.quick else MIN_RUNS  # (the spread is stated over at least 5 runs)
    return [
        Step(
            f"{FAMILY}: {_workload(hold)}",
            repeats * len(SUBJECTS) * (seconds + 1.5),
            lambda hold=hold: _semaphore(suite, directory, seconds, repeats, hold),  # type: ignore[misc]
        )
        for hold in HOLDS
    ]


def _workload(hold: float) -> str:
    return f"{WORKLOAD}, {hold * 1e3:g} ms sections"


def _run(name: str, directory: str, seconds: float, hold: float) -> Run:
    witness = _CountingWitness(LIMIT, hold)

    def make() -> tuple[SyncLockFor, Witness]:  # in each worker process
        return dict(SUBJECTS)[name](directory), witness

    return run_processes(make, [[0]] * PROCESSES, seconds)


def _semaphore(suite: Suite, directory: str, seconds: float, repeats: int, hold: float) -> None:
    workload = _workload(hold)
    ops: dict[str, list[float]] = {name: [] for name, _ in SUBJECTS}
    p99: dict[str, list[float]] = {name: [] for name, _ in SUBJECTS}
    violations = dict.fromkeys(ops, 0)
    for _, name, _make in rotated(SUBJECTS, repeats):
        run = _run(name, directory, seconds, hold)
        ops[name].append(run.ops)
        waits = sorted(run.waits)
        p99[name].append(statistics.quantiles(waits, n=100)[98] * 1e3 if len(waits) > 1 else 0)
        violations[name] += run.violations
    baseline = SUBJECTS[1][0]
    for name, _ in SUBJECTS:
        extra = {"violations": float(violations[name])}
        suite.add(
            Row.of(
                workload,
                name,
                "ops/s",
                ops[name],
                higher_is_better=True,
                baseline=baseline,
                extra=extra,
                family=FAMILY,
                workers=PROCESSES,
            )
        )
        suite.add(
            Row.of(
                f"{workload}: wait p99",
                name,
                "ms",
                p99[name],
                baseline=baseline,
                family=FAMILY,
                workers=PROCESSES,
            )
        )
