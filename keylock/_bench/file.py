"""One-host workloads: keylock's FileBackend against filelock.FileLock and a raw
portalocker.Lock (each at a 0.5 ms poll and at its default poll), in one run on the same
directory: uncontended, then processes contending. The yardstick: processes blocking in flock
on one file, no library, which is as fast as the kernel hands a lock between processes."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from typing import TYPE_CHECKING

from .. import KeyedLock
from ..backends.file import FileBackend
from . import filepermits
from .contend import FileWitness, Run, SyncLockFor, Witness, run_processes
from .harness import MIN_RUNS, Row, Suite
from .progress import Step
from .workload import HEADLINE_WORKERS, WORKERS, Subjects, estimate, hot_key_steps, zipf

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractContextManager, ExitStack

__all__ = ["steps"]

FAMILY = "file, processes"

#: The peers wait by polling the OS lock: every 0.5 ms (keylock's old first pause), and at
#: their defaults (portalocker 0.25 s, filelock 50 ms), which is what users get out of the box.
#: Their timeout is raised to 60 s either way (portalocker's default 5 s could fail a run).
_POLL = 0.0005
_PORTALOCKER_POLL = 0.25  # portalocker.Lock's check_interval default
_FILELOCK_POLL = 0.05  # filelock.FileLock's poll_interval default

#: The yardstick's name, and what its row says.
KERNEL = "flock, no library (kernel)"
_KERNEL_NOTE = "processes blocking in flock on one file: the kernel's own hand-off"


def _keylock(directory: str) -> SyncLockFor:
    locks = KeyedLock(FileBackend(directory))
    return lambda key: locks.sync(f"k{key}")


def _portalocker(poll: float) -> Callable[[str], SyncLockFor]:
    def make(directory: str) -> SyncLockFor:
        import portalocker

        def lock_for(key: int) -> AbstractContextManager[object]:
            path = os.path.join(directory, f"portalocker-{key}.lock")
            return portalocker.Lock(path, timeout=60, check_interval=poll)

        return lock_for

    return make


def _filelock(poll: float) -> Callable[[str], SyncLockFor | None]:
    def make(directory: str) -> SyncLockFor | None:
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
                lock = locks[key] = filelock.FileLock(path, timeout=60, poll_interval=poll)
            return lock

        return lock_for

    return make


class _Flock:
    """One open file, locked by a blocking flock on enter, unlocked on exit: nothing else."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _kernel(directory: str) -> SyncLockFor:
    files: dict[int, _Flock] = {}

    def lock_for(key: int) -> AbstractContextManager[object]:
        lock = files.get(key)
        if lock is None:
            lock = files[key] = _Flock(os.path.join(directory, f"flock-{key}.lock"))
        return lock

    return lock_for


#: Subjects of every workload.
SUBJECTS: list[tuple[str, Callable[[str], SyncLockFor | None]]] = [
    ("portalocker.Lock (raw, 0.5 ms poll)", _portalocker(_POLL)),
    ("keylock FileBackend", _keylock),
    ("filelock.FileLock (0.5 ms poll)", _filelock(_POLL)),
    (KERNEL, _kernel),
]
#: Subjects of the contended workloads only (their polls change nothing uncontended).
DEFAULT_POLLS: list[tuple[str, Callable[[str], SyncLockFor | None]]] = [
    ("portalocker.Lock (raw, default 0.25 s poll)", _portalocker(_PORTALOCKER_POLL)),
    ("filelock.FileLock (default 50 ms poll)", _filelock(_FILELOCK_POLL)),
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
    repeats = 2 if suite.quick else MIN_RUNS  # (the spread is stated over at least 5 runs)
    subjects: Subjects = [
        (name, _processes(name, directory) if make(directory) is not None else None)
        for name, make in SUBJECTS + DEFAULT_POLLS
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
            yardsticks={KERNEL: _KERNEL_NOTE},
        ),
    ]
    if not suite.headline:
        steps += filepermits.steps(suite, directory)  # (a semaphore across processes)
        libraries = [(name, run) for name, run in subjects if name != KERNEL]  # (hot key only)
        steps.append(
            Step(
                f"{FAMILY}: 1,000 Zipf keys",
                estimate(libraries, seconds, repeats, overhead=_OVERHEAD),
                lambda: zipf(suite, FAMILY, "process", libraries, seconds=seconds, repeats=repeats),
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
        suite.add(Row.of(workload, name, "us", values, reference=name == KERNEL))


def _processes(name: str, directory: str) -> Callable[[Sequence[Sequence[int]], float], Run]:
    def run(keys: Sequence[Sequence[int]], seconds: float) -> Run:
        witness = FileWitness(directory, 1 + max(max(seq) for seq in keys))

        def make() -> tuple[SyncLockFor, Witness]:  # in each worker process
            lock_for = dict(SUBJECTS + DEFAULT_POLLS)[name](directory)
            assert lock_for is not None
            return lock_for, witness

        return run_processes(make, keys, seconds)

    return run
