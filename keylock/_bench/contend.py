"""Contention runs: workers (asyncio tasks, threads or processes) take locks on a sequence of
keys until a deadline; a witness independent of the lock under test counts exclusion
violations and hand-offs; every wait is recorded.

A hand-off is an acquisition whose previous holder of that key was another worker. Only
acquisitions granted before the deadline count; a wait still open at the deadline is recorded
at its length so far, so a starved waiter shows in the tail instead of vanishing. A process
still waiting ``grace`` seconds after the deadline reports what it has and exits, so a slow
peer cannot stretch a run.
"""

from __future__ import annotations

import abc
import array
import asyncio
import errno
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = [
    "AsyncLockFor",
    "FileWitness",
    "Run",
    "SyncLockFor",
    "ThreadWitness",
    "Witness",
    "run_processes",
    "run_tasks",
    "run_threads",
]

#: key index -> a context manager holding that key (entered once)
SyncLockFor = Callable[[int], AbstractContextManager[object]]
AsyncLockFor = Callable[[int], AbstractAsyncContextManager[object]]

_clock = time.monotonic  # CLOCK_MONOTONIC: one timeline for every process of the host


@dataclass
class Run:
    """What the workers of one run saw before its deadline."""

    seconds: float
    acquisitions: int = 0
    handoffs: int = 0
    violations: int = 0
    waits: array.array[float] = field(default_factory=lambda: array.array("d"))

    @property
    def ops(self) -> float:
        """Acquisitions per second."""
        return self.acquisitions / self.seconds

    @property
    def handoff_rate(self) -> float:
        """Hand-offs (acquisitions by another worker than the key's last holder) per second."""
        return self.handoffs / self.seconds

    def absorb(self, other: Run) -> None:
        self.acquisitions += other.acquisitions
        self.handoffs += other.handoffs
        self.violations += other.violations
        self.waits.extend(other.waits)


class Witness(abc.ABC):
    """Checks exclusion without trusting the lock under test."""

    @abc.abstractmethod
    def enter(self, key: int, me: int) -> tuple[bool, bool]:
        """Called first inside the section: (another holder is inside too, the previous holder
        of *key* was another worker than *me*)."""

    @abc.abstractmethod
    def leave(self, key: int, violated: bool) -> None:
        """Called last inside the section, with what :meth:`enter` said."""


class ThreadWitness(Witness):
    """One process: a marker ``threading.Lock`` per key, taken without blocking."""

    def __init__(self, keys: int) -> None:
        self._markers = [threading.Lock() for _ in range(keys)]
        self._last = [0] * keys  # written only by a holder whose marker try succeeded

    def enter(self, key: int, me: int) -> tuple[bool, bool]:
        if not self._markers[key].acquire(blocking=False):
            return True, False
        last, self._last[key] = self._last[key], me
        return False, last not in (0, me)

    def leave(self, key: int, violated: bool) -> None:
        if not violated:
            self._markers[key].release()


class FileWitness(Witness):
    """Processes of one host: an ``O_EXCL`` marker file per key, and the last holder of each
    key in shared memory (create it before the workers fork)."""

    def __init__(self, directory: str, keys: int) -> None:
        self._directory = directory
        self._last = multiprocessing.get_context("fork").RawArray("i", keys)

    def _marker(self, key: int) -> str:
        return os.path.join(self._directory, f"witness-{key}")

    def enter(self, key: int, me: int) -> tuple[bool, bool]:
        try:
            os.close(os.open(self._marker(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            return True, False
        last, self._last[key] = self._last[key], me
        return False, last not in (0, me)

    def leave(self, key: int, violated: bool) -> None:
        if not violated:
            os.unlink(self._marker(key))


# ----------------------------------------------------------------------------------- tasks


def run_tasks(
    make: Callable[[], AsyncLockFor], keys: Sequence[Sequence[int]], seconds: float
) -> Run:
    """One asyncio task per entry of *keys*, each cycling through its key sequence; the holder
    yields to the loop once inside (otherwise an uncontended task would never let others run).
    *make* is called inside the new event loop. Runs *seconds* of wall time; its rates are per
    CPU second of the loop's thread, its waits in wall time."""

    async def body() -> Run:
        lock_for = make()
        size = 1 + max(max(seq) for seq in keys)
        inside = [0] * size
        last = [0] * size
        run = Run(seconds)
        waits = run.waits
        deadline = _clock() + seconds

        async def worker(me: int, seq: Sequence[int]) -> None:
            i, n = 0, len(seq)
            while True:
                asked = _clock()
                if asked >= deadline:
                    return
                key = seq[i]
                i = i + 1 if i + 1 < n else 0
                async with lock_for(key):
                    granted = _clock()
                    inside[key] += 1  # one thread: a plain counter is an independent witness
                    violated = inside[key] != 1
                    previous, last[key] = last[key], me
                    await asyncio.sleep(0)
                    inside[key] -= 1
                if granted >= deadline:
                    waits.append(deadline - asked)
                    return
                waits.append(granted - asked)
                run.acquisitions += 1
                run.violations += violated
                run.handoffs += previous not in (0, me)

        cpu = time.thread_time()
        await asyncio.gather(*(worker(me, seq) for me, seq in enumerate(keys, 1)))
        # rates per second of the loop thread's CPU: one thread does all the work, and the
        # time another process had the core (a shared machine) is not the lock's
        run.seconds = max(time.thread_time() - cpu, 1e-9)
        return run

    return asyncio.run(body())


# --------------------------------------------------------------------- threads and processes


_Report = tuple[int, int, int, bytes]  # acquisitions, hand-offs, violations, waits (doubles)


class _Tally(Run):
    """One worker's run, plus the wait in progress (for a report made from another thread)."""

    asked: float | None = None
    deadline: float = 0.0

    def report(self) -> _Report:
        waits = array.array("d", self.waits)
        asked = self.asked
        if asked is not None:  # still waiting: counted at its length so far
            waits.append(max(0.0, self.deadline - asked))
        return self.acquisitions, self.handoffs, self.violations, waits.tobytes()


def _loop(lock_for: SyncLockFor, witness: Witness, seq: Sequence[int], me: int, t: _Tally) -> None:
    i, n, deadline, waits = 0, len(seq), t.deadline, t.waits
    while True:
        asked = _clock()
        if asked >= deadline:
            return
        key = seq[i]
        i = i + 1 if i + 1 < n else 0
        t.asked = asked
        with lock_for(key):
            granted = _clock()
            violated, handoff = witness.enter(key, me)
            witness.leave(key, violated)
        t.asked = None
        if granted >= deadline:
            waits.append(deadline - asked)
            return
        waits.append(granted - asked)
        t.acquisitions += 1
        t.violations += violated
        t.handoffs += handoff


def run_threads(lock_for: SyncLockFor, keys: Sequence[Sequence[int]], seconds: float) -> Run:
    """One thread per entry of *keys*, each cycling through its key sequence (the section holds
    the witness check only: threads interleave wherever the interpreter switches them)."""
    size = 1 + max(max(seq) for seq in keys)
    witness = ThreadWitness(size)
    tallies = [_Tally(seconds) for _ in keys]
    start = threading.Barrier(len(keys) + 1)

    def worker(me: int, seq: Sequence[int], tally: _Tally) -> None:
        start.wait()
        _loop(lock_for, witness, seq, me, tally)

    threads = [
        threading.Thread(target=worker, args=(me, seq, tally), daemon=True)
        for me, (seq, tally) in enumerate(zip(keys, tallies, strict=True), 1)
    ]
    for thread in threads:
        thread.start()
    deadline = _clock() + seconds
    for tally in tallies:
        tally.deadline = deadline
    start.wait()
    for thread in threads:
        thread.join()
    run = Run(seconds)
    for tally in tallies:
        run.absorb(tally)
    return run


def _process(
    make: Callable[[], tuple[SyncLockFor, Witness]],
    seq: Sequence[int],
    seconds: float,
    grace: float,
    ready: threading.Barrier,
    go: threading.Event,
    start: Sequence[float],  # [when the clock started], shared memory
    conn: Connection[_Report, object],
    me: int,
) -> None:
    lock_for, witness = make()
    with lock_for(seq[0]):
        pass  # connect, load scripts, open files: before the clock starts
    tally = _Tally(seconds)
    sent = threading.Lock()

    def send(*, bail: bool) -> None:
        if sent.acquire(blocking=False):
            conn.send(tally.report())
            conn.close()
            if bail:  # still blocked in a slow peer's acquire: leave without it
                os._exit(0)

    ready.wait()
    go.wait()
    tally.deadline = start[0] + seconds
    timer = threading.Timer(tally.deadline + grace - _clock(), send, kwargs={"bail": True})
    timer.daemon = True
    timer.start()
    _loop(lock_for, witness, seq, me, tally)
    send(bail=False)
    timer.cancel()


def run_processes(
    make: Callable[[], tuple[SyncLockFor, Witness]],
    keys: Sequence[Sequence[int]],
    seconds: float,
    *,
    grace: float = 1.0,
) -> Run:
    """One forked process per entry of *keys*; *make* runs in each child and returns its lock
    factory and witness. Every child connects and warms up before the clock starts."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(len(keys) + 1)
    go = ctx.Event()
    start = ctx.RawArray("d", 1)
    children = []
    for me, seq in enumerate(keys, 1):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_process,
            args=(make, seq, seconds, grace, ready, go, start, send, me),
            daemon=True,
        )
        proc.start()
        send.close()
        children.append((proc, receive))
    run = Run(seconds)
    try:
        ready.wait(timeout=120)
        start[0] = _clock()
        go.set()
        for proc, receive in children:
            if not receive.poll(seconds + grace + 60):
                raise RuntimeError(f"benchmark worker {proc.pid} sent no result")
            acquisitions, handoffs, violations, waits = receive.recv()
            run.absorb(Run(seconds, acquisitions, handoffs, violations))
            run.waits.frombytes(waits)
    finally:
        for proc, receive in children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            receive.close()
    return run
