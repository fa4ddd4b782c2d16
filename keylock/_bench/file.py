"""One-host workloads: keylock's FileBackend against filelock.FileLock and a raw
portalocker.Lock, in one run on the same directory."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from .. import KeyedLock
from ..backends.file import FileBackend
from .harness import Row, Suite

__all__ = ["run"]

SyncFactory = Callable[[str], Callable[[], AbstractContextManager[object]] | None]


def _keylock(directory: str) -> Callable[[], AbstractContextManager[object]]:
    locks = KeyedLock(FileBackend(directory))
    return lambda: locks.sync("bench")


def _portalocker(directory: str) -> Callable[[], AbstractContextManager[object]]:
    import portalocker

    path = os.path.join(directory, "portalocker.lock")
    return lambda: portalocker.Lock(path, timeout=60, check_interval=0.0005)


def _filelock(directory: str) -> Callable[[], AbstractContextManager[object]] | None:
    try:
        import filelock
    except ImportError:
        return None
    path = os.path.join(directory, "filelock.lock")
    # one FileLock object per process, as filelock documents (it is reentrant per object)
    lock = filelock.FileLock(path, timeout=60)
    return lambda: lock


SUBJECTS: list[tuple[str, SyncFactory]] = [
    ("portalocker.Lock (raw)", _portalocker),
    ("keylock FileBackend", _keylock),
    ("filelock.FileLock", _filelock),
]


def run(suite: Suite) -> None:
    """Uncontended acquire+release, then 8 processes on one key; rows go to *suite*."""
    with tempfile.TemporaryDirectory(prefix="keylock-bench-") as directory:
        _uncontended(suite, directory, 3 if suite.quick else 7)
        _hot_key(suite, directory, 3 if suite.quick else 5)


def _uncontended(suite: Suite, directory: str, repeats: int) -> None:
    n = 5_000 if suite.quick else 20_000
    workload = "file: uncontended acquire+release"
    figures: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved, so drift hits every subject alike
        for name, make in SUBJECTS:
            factory = make(directory)
            if factory is None:
                continue
            start = time.perf_counter()
            for _ in range(n):
                with factory():
                    pass
            figures.setdefault(name, []).append((time.perf_counter() - start) / n * 1e6)
    for name, values in figures.items():
        suite.add(
            Row.of(
                workload,
                name,
                "us",
                values,
                baseline="portalocker.Lock (raw)",
            )
        )


def _worker(
    name: str, directory: str, seconds: float, start: object, count: object, bad: object
) -> None:
    factory = dict(SUBJECTS)[name](directory)
    assert factory is not None
    marker = os.path.join(directory, f"{name}.holder")
    done = 0
    violations = 0
    start.wait()  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with factory():
            try:  # an O_EXCL marker, independent of the lock, catches two holders at once
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                violations += 1
                continue
            os.close(fd)
            os.unlink(marker)
            done += 1
    with count.get_lock():  # type: ignore[attr-defined]
        count.value += done  # type: ignore[attr-defined]
    with bad.get_lock():  # type: ignore[attr-defined]
        bad.value += violations  # type: ignore[attr-defined]


def _hot_key(suite: Suite, directory: str, repeats: int) -> None:
    processes = 8
    seconds = 1.0 if suite.quick else 2.0
    workload = f"file: one key, {processes} processes"
    ctx = multiprocessing.get_context("fork")
    for name, make in SUBJECTS:
        if make(directory) is None:
            suite.say(f"{name}: not installed, skipped")
            continue
        rates = []
        violations = 0
        for _ in range(repeats):
            count = ctx.Value("q", 0)
            bad = ctx.Value("q", 0)
            start = ctx.Event()
            procs = [
                ctx.Process(target=_worker, args=(name, directory, seconds, start, count, bad))
                for _ in range(processes)
            ]
            for proc in procs:
                proc.start()
            start.set()
            for proc in procs:
                proc.join()
            rates.append(count.value / seconds)
            violations += bad.value
        rates.sort()
        suite.add(
            Row(
                workload,
                name,
                "hand-offs/s",
                rates[len(rates) // 2],
                rates[0],
                rates[-1],
                repeats,
                higher_is_better=True,
                baseline="filelock.FileLock",
                notes=f"{violations} exclusion violations",
                extra={"violations": violations},
            )
        )
