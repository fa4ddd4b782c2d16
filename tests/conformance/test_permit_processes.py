"""Holder counts under processes: never more than ``limit`` permits, never a reader beside a
writer, when the holders are separate processes of a cross-process backend.

Each process counts itself in and out of a shared counter around a sleep inside its lease;
a backend that let one holder too many in is seen within a few rounds. Rows: every backend in
PERMIT_PROCESS_BACKENDS for a semaphore of limit 3 and an RW mix, and the file backend's
locks (limit 1 by construction), which keep this harness itself checked.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest

from keylock import KeyedLock
from keylock.backends import Backend
from keylock.backends.base import RW_LIMIT

from ..conftest import PERMIT_PROCESS_BACKENDS, PROCESS_CLIENTS

ctx = multiprocessing.get_context("spawn")  # (no threads of the test process inherited)

ROWS = [pytest.param("file", "lock", id="file-lock")] + [
    pytest.param(name, shape, id=f"{name}-{shape}")
    for name in PERMIT_PROCESS_BACKENDS
    for shape in ("sem3", "rw")
]


def _work(make: Callable[[], Backend], shape: str, index: int, counts: Any, rounds: int) -> None:
    backend = make()
    writer = shape == "lock" or (shape == "rw" and index % 3 == 0)
    if shape == "lock":
        locks = KeyedLock(backend)
    elif shape == "sem3":
        locks = KeyedLock(backend.permits(3))
    else:
        locks = KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT if writer else 1))
    try:
        for _ in range(rounds):
            with locks.sync("shared", timeout=60):
                with counts.get_lock():
                    counts[0] += 1  # holders inside
                    counts[1] += writer  # writers inside
                    counts[2] = max(counts[2], counts[0])  # most holders at once
                    if counts[1] and counts[0] > 1:
                        counts[3] += 1  # a writer beside anyone
                time.sleep(0.002)
                with counts.get_lock():
                    counts[0] -= 1
                    counts[1] -= writer
    finally:
        backend.close_sync()


@pytest.mark.parametrize(("backend", "shape"), ROWS)
def test_processes_never_exceed_the_limit(
    request: pytest.FixtureRequest, backend: str, shape: str
) -> None:
    make = PROCESS_CLIENTS[backend](request)
    counts = ctx.Array("i", 4)
    workers = [
        ctx.Process(target=_work, args=(make, shape, index, counts, 15)) for index in range(6)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * 6
    most, mixed = counts[2], counts[3]
    assert mixed == 0
    assert 1 <= most <= {"lock": 1, "sem3": 3, "rw": 6}[shape]
