"""One-host workloads: keylock's FileBackend against filelock.FileLock and a raw
portalocker.Lock, in one run on the same directory: uncontended, then processes contending."""

from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING

from .. import KeyedLock
from ..backends.file import FileBackend
from .contend import FileWitness, Run, SyncLockFor, Witness, run_processes
from .harness import Row, Suite
from .progress import Step
from .workload import HEADLINE_WORKERS, WORKERS, Subjects, estimate, hot_key_steps, zipf

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractContextManager, ExitStack

__all__ = ["steps"]

FAMILY = "file, processes"

#: The peers wait by polling the OS lock; they poll every 0.5 ms, keylock's first pause.
_POLL = 0.0005


def _keylock(directory: str) -> SyncLockFor:
    locks = KeyedLock(FileBackend(directory))
    return lambda key: locks.sync(f"k{key}")


def _portalocker(directory: str) -> SyncLockFor:
    import portalocker

    def lock_for(key: int) -> AbstractContextManager[object]:
        path = os.path.join(directory, f"portalocker-{key}.lock")
        return portalocker.Lock(path, timeout=60, check_interval=_POLL)

    return lock_for


def _filelock(directory: str) -> SyncLockFor | None:
    try:
        import filelock
    except ImportError:
        return None
    # one FileLock object per path and process, as filelock documents (reentrant per object)
    locks: dict[int, filelock.FileLock] = {}

    def lock_for(key: int) -> AbstractContextManager[object]:
        lock = locks.get(key)
        if lock is None:
            path = os.path.join(directory, f"filelock-{key}.lock")
            lock = locks[key] = filelock.FileLock(path, timeout=60, poll_interval=_POLL)
        return lock

    return lock_for


SUBJECTS: list[tuple[str, Callable[[str], SyncLockFor | None]]] = [
    ("portalocker.Lock (raw)", _portalocker),
    ("keylock FileBackend", _keylock),
    ("filelock.FileLock", _filelock),
]


def steps(suite: Suite, stack: ExitStack) -> list[Step]:
    """Uncontended acquire+release, then 1-16 processes on one key and 8 on 1,000 Zipf keys
    (headline: 4 processes on one key), all in one temporary directory that *stack* removes;
    rows go to *suite*."""
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="keylock-bench-"))
    repeats = 3 if suite.quick else 7
    found = [
        Step(
            "file: uncontended acquire+release",
            2 if suite.quick else 6,
            lambda: _uncontended(suite, directory, repeats),
        )
    ]
    seconds = 0.3 if suite.quick else 1.0
    repeats = 2 if suite.quick else 3
    subjects: Subjects = [
        (name, _processes(name, directory) if make(directory) is not None else None)
        for name, make in SUBJECTS
    ]
    # the headline run: one hot-key row at one worker count, no Zipf keys
    steps = [
        *found,
        *hot_key_steps(
            suite,
            FAMILY,
            "process",
            subjects,
            seconds=seconds,
            repeats=repeats,
            workers=(HEADLINE_WORKERS,) if suite.headline else WORKERS,
            overhead=_OVERHEAD,
        ),
    ]
    if not suite.headline:
        steps.append(
            Step(
                f"{FAMILY}: 1,000 Zipf keys",
                estimate(subjects, seconds, repeats, overhead=_OVERHEAD),
                lambda: zipf(suite, FAMILY, "process", subjects, seconds=seconds, repeats=repeats),
            )
        )
    return steps


#: Seconds a run over processes spends outside its clock (fork, warm-up, join).
_OVERHEAD = 0.3


def _uncontended(suite: Suite, directory: str, repeats: int) -> None:
    n = 5_000 if suite.quick else 20_000
    workload = "file: uncontended acquire+release"
    figures: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved, so drift hits every subject alike
        for name, make in SUBJECTS:
            lock_for = make(directory)
            if lock_for is None:
                continue
            start = time.perf_counter()
            for _ in range(n):
                with lock_for(0):
                    pass
            figures.setdefault(name, []).append((time.perf_counter() - start) / n * 1e6)
    for name, values in figures.items():
        suite.add(Row.of(workload, name, "us", values))


def _processes(name: str, directory: str) -> Callable[[Sequence[Sequence[int]], float], Run]:
    def run(keys: Sequence[Sequence[int]], seconds: float) -> Run:
        witness = FileWitness(directory, 1 + max(max(seq) for seq in keys))

        def make() -> tuple[SyncLockFor, Witness]:  # in each worker process
            lock_for = dict(SUBJECTS)[name](directory)
            assert lock_for is not None
            return lock_for, witness

        return run_processes(make, keys, seconds)

    return run
