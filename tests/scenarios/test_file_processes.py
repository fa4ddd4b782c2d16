"""Processes on one host sharing keys through FileBackend: lost updates, crashes, fork, and
lock-file cleanup racing acquirers. Real processes (multiprocessing, fork start method)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout
from keylock.backends import FileBackend

ctx = multiprocessing.get_context("fork")


def _increment(directory: str, counter: str, rounds: int, locked: bool) -> None:
    locks = KeyedLock(FileBackend(directory))
    for _ in range(rounds):
        if locked:
            with locks.sync("counter"):
                _read_modify_write(counter)
        else:
            _read_modify_write(counter)


def _read_modify_write(counter: str) -> None:
    with open(counter) as fh:
        value = int(fh.read() or 0)
    time.sleep(0.0002)  # the hop between read and write, where the naive version loses updates
    with open(counter, "w") as fh:
        fh.write(str(value + 1))


def _run(target: object, *args: object, count: int) -> None:
    procs = [ctx.Process(target=target, args=args) for _ in range(count)]  # type: ignore[arg-type]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0


@pytest.mark.parametrize("locked", [True, False], ids=["keylock", "naive"])
def test_eight_processes_increment_a_counter_file(tmp_path: Path, locked: bool) -> None:
    """8 processes x 100 read-modify-write increments: 800 with keylock. The naive version (no
    lock) runs the same loop and loses updates, which proves the check can fail."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    _run(_increment, str(tmp_path / "locks"), str(counter), 100, locked, count=8)
    total = int(counter.read_text() or 0)
    if locked:
        assert total == 800
    else:
        assert total < 800


def _hold_forever(directory: str, ready: object) -> None:
    locks = KeyedLock(FileBackend(directory))
    locks.acquire_sync("crash")
    ready.set()  # type: ignore[attr-defined]
    time.sleep(600)


def test_a_killed_holder_releases_its_lock(tmp_path: Path) -> None:
    """The OS frees the lock of a SIGKILLed holder: the waiter gets the key long before its
    timeout (no TTL involved)."""
    directory = str(tmp_path)
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_forever, args=(directory, ready))
    holder.start()
    assert ready.wait(30)
    locks = KeyedLock(FileBackend(directory))
    with pytest.raises(LockTimeout):
        locks.acquire_sync("crash", timeout=0)
    started = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    lease = locks.acquire_sync("crash", timeout=60)
    assert time.monotonic() - started < 30  # promptly: well before the waiter's timeout
    lease.release_sync()
    holder.join(10)


def _child_tries_the_parents_lease(directory: str, lease: object, results: object) -> None:
    outcome = []
    try:
        lease.release_sync()  # type: ignore[attr-defined]
        outcome.append("released")
    except LeaseLost:
        outcome.append("LeaseLost")
    try:
        KeyedLock(FileBackend(directory)).acquire_sync("forked", timeout=0)
        outcome.append("acquired")
    except LockTimeout:
        outcome.append("LockTimeout")
    results.put(outcome)  # type: ignore[attr-defined]


def test_a_forked_child_neither_releases_nor_inherits_the_parents_lease(tmp_path: Path) -> None:
    """filelock #634: a forked child released the parent's lock. Here the child's release
    raises LeaseLost and leaves the lock alone, and the child cannot take the key."""
    directory = str(tmp_path)
    locks = KeyedLock(FileBackend(directory))
    lease = locks.acquire_sync("forked")
    results = ctx.Queue()
    child = ctx.Process(target=_child_tries_the_parents_lease, args=(directory, lease, results))
    child.start()
    assert results.get(timeout=30) == ["LeaseLost", "LockTimeout"]
    child.join(10)
    probe = ctx.Queue()
    other = ctx.Process(target=_try_once, args=(directory, "forked", probe))
    other.start()
    assert probe.get(timeout=30) == "LockTimeout"  # the parent still holds it
    other.join(10)
    lease.release_sync()


def _try_once(directory: str, key: str, results: object) -> None:
    try:
        KeyedLock(FileBackend(directory)).acquire_sync(key, timeout=0).release_sync()
        results.put("acquired")  # type: ignore[attr-defined]
    except LockTimeout:
        results.put("LockTimeout")  # type: ignore[attr-defined]


def _cycle_with_witness(directory: str, witness: str, rounds: int, violations: object) -> None:
    locks = KeyedLock(FileBackend(directory))
    for _ in range(rounds):
        with locks.sync("hot"):
            try:
                fd = os.open(witness, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                with violations.get_lock():  # type: ignore[attr-defined]
                    violations.value += 1  # type: ignore[attr-defined]
                continue
            os.close(fd)
            os.unlink(witness)


def _prune_forever(directory: str, stop: object) -> None:
    backend = FileBackend(directory)
    while not stop.is_set():  # type: ignore[attr-defined]
        backend.prune()


def test_cleanup_racing_sixteen_processes_never_makes_two_holders(tmp_path: Path) -> None:
    """16 processes x 2,000 cycles on one key while another process prunes lock files the
    whole time; an O_EXCL witness file, independent of keylock, counts double holders. An
    unlink without the inode re-check (filelock #574) lets two processes hold two inodes."""
    directory = str(tmp_path / "locks")
    FileBackend(directory)
    violations = ctx.Value("i", 0)
    stop = ctx.Event()
    pruner = ctx.Process(target=_prune_forever, args=(directory, stop))
    pruner.start()
    try:
        _run(
            _cycle_with_witness,
            directory,
            str(tmp_path / "witness"),
            2_000,
            violations,
            count=16,
        )
    finally:
        stop.set()
        pruner.join(30)
    assert violations.value == 0


def _take_turns(directory: str, log: str, rounds: int, name: str, start: object) -> None:
    locks = KeyedLock(FileBackend(directory))
    start.wait()  # type: ignore[attr-defined]
    for _ in range(rounds):
        with locks.sync("turns"), open(log, "a") as fh:
            fh.write(name)


def test_a_releasing_process_does_not_keep_the_key_from_waiting_ones(tmp_path: Path) -> None:
    """Three processes acquire one key 200 times each in tight loops. A process that releases
    while others wait steps aside until one of them had a turn, so no process keeps the key for
    long. Without that, the releaser took the key straight back while the others slept
    between polls: runs of hundreds (one process finished all its rounds first)."""
    log = tmp_path / "log"
    log.write_text("")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_take_turns, args=(str(tmp_path / "locks"), str(log), 200, n, start))
        for n in "abc"
    ]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    order = log.read_text()
    assert sorted(order) == sorted("abc" * 200)  # every turn taken, none lost
    # while all three contend: from when the last one started to when the first one finished
    both_ends = order[max(order.index(n) for n in "abc") : min(order.rindex(n) for n in "abc")]
    longest = max((len(list(run)) for _, run in itertools.groupby(both_ends)), default=0)
    assert longest < 20, f"one process kept the key for {longest} turns in a row"
