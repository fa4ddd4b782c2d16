"""In-process contention: keylock's MemoryBackend against a bare asyncio.Lock, a bare
threading.Lock, asyncio-keyed-lock, and a dict of locks, with tasks and with threads."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from .. import KeyedLock
from .contend import AsyncLockFor, Run, SyncLockFor, run_tasks, run_threads
from .progress import Step
from .workload import HEADLINE_WORKERS, Subjects, estimate, hot_key_steps, zipf

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractAsyncContextManager, AbstractContextManager

    from .harness import Suite

__all__ = ["steps"]

TASKS = "in-process, tasks"
THREADS = "in-process, threads"

#: Why the bare threading.Lock's hot-key hand-offs are no yardstick for a keyed lock's: it
#: barges (the releasing thread takes it straight back), so another thread gets it only when
#: the interpreter switches threads while the holder is inside (a 5 ms switch interval) and the
#: OS has the woken waiter ready; five 1 s runs at 2 threads gave 127 to 9,144 hand-offs/s.
BARGING = (
    "a reference, not ranked: it barges, so its hand-offs count GIL switches landing inside "
    "the section (they swing 70x run to run), not hand-off speed; compare acquisitions/s"
)


def _tasks(make: Callable[[], AsyncLockFor]) -> Callable[[Sequence[Sequence[int]], float], Run]:
    return lambda keys, seconds: run_tasks(make, keys, seconds)


def _threads(make: Callable[[], SyncLockFor]) -> Callable[[Sequence[Sequence[int]], float], Run]:
    return lambda keys, seconds: run_threads(make(), keys, seconds)


def _keylock_async() -> AsyncLockFor:
    locks = KeyedLock()
    return lambda key: locks(str(key))


def _keylock_sync() -> SyncLockFor:
    locks = KeyedLock()
    return lambda key: locks.sync(str(key))


def _one_asyncio_lock() -> AsyncLockFor:
    lock = asyncio.Lock()
    return lambda key: lock


def _one_threading_lock() -> SyncLockFor:
    lock = threading.Lock()
    return lambda key: lock


def _dict_of_asyncio_locks() -> AsyncLockFor:
    locks: dict[int, asyncio.Lock] = {}

    def lock_for(key: int) -> AbstractAsyncContextManager[object]:
        lock = locks.get(key)
        if lock is None:
            lock = locks[key] = asyncio.Lock()
        return lock

    return lock_for


def _dict_of_threading_locks() -> SyncLockFor:
    locks: dict[int, threading.Lock] = {}

    def lock_for(key: int) -> AbstractContextManager[object]:
        lock = locks.get(key)
        if lock is None:  # setdefault is atomic: two threads never get two locks for one key
            lock = locks.setdefault(key, threading.Lock())
        return lock

    return lock_for


def _asyncio_keyed_lock() -> Callable[[], AsyncLockFor] | None:
    try:
        from asyncio_keyed_lock import AsyncioKeyedLock
    except ImportError:
        return None

    def make() -> AsyncLockFor:
        locks = AsyncioKeyedLock()
        return lambda key: locks(str(key))

    return make


def steps(suite: Suite) -> list[Step]:
    """Hot key with 1-16 tasks and threads, then 1,000 Zipf keys (headline: one hot key, 4
    tasks); rows go to *suite*."""
    seconds = 0.1 if suite.quick else 0.3
    repeats = 3 if suite.quick else 5
    peer = _asyncio_keyed_lock()
    tasks: Subjects = [
        ("asyncio.Lock (bare, one key)", _tasks(_one_asyncio_lock)),
        ("keylock KeyedLock()", _tasks(_keylock_async)),
        ("asyncio-keyed-lock", _tasks(peer) if peer else None),
    ]
    if suite.headline:
        return hot_key_steps(
            suite,
            TASKS,
            "task",
            tasks,
            seconds=seconds,
            repeats=repeats,
            workers=(HEADLINE_WORKERS,),
        )
    threads: Subjects = [
        ("threading.Lock (bare, one key)", _threads(_one_threading_lock)),
        ("keylock KeyedLock().sync", _threads(_keylock_sync)),
    ]
    zipf_tasks: Subjects = [
        ("dict of asyncio.Lock (never freed)", _tasks(_dict_of_asyncio_locks)),
        ("keylock KeyedLock()", _tasks(_keylock_async)),
        ("asyncio-keyed-lock", _tasks(peer) if peer else None),
    ]
    zipf_threads: Subjects = [
        ("dict of threading.Lock (never freed)", _threads(_dict_of_threading_locks)),
        ("keylock KeyedLock().sync", _threads(_keylock_sync)),
    ]
    return [
        *hot_key_steps(suite, TASKS, "task", tasks, seconds=seconds, repeats=repeats),
        *hot_key_steps(
            suite,
            THREADS,
            "thread",
            threads,
            seconds=seconds,
            repeats=repeats,
            yardsticks={"threading.Lock (bare, one key)": BARGING},
        ),
        Step(
            f"{TASKS}: 1,000 Zipf keys",
            estimate(zipf_tasks, seconds, repeats),
            lambda: zipf(suite, TASKS, "task", zipf_tasks, seconds=seconds, repeats=repeats),
        ),
        Step(
            f"{THREADS}: 1,000 Zipf keys",
            estimate(zipf_threads, seconds, repeats),
            lambda: zipf(suite, THREADS, "thread", zipf_threads, seconds=seconds, repeats=repeats),
        ),
    ]
