"""Processes on one host sharing keys through FileBackend: lost updates, crashes, fork, and
lock-file cleanup racing acquirers. Real processes (multiprocessing, fork start method)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout
from keylock.backends import FileBackend
from keylock.backends.file import file_name

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


def test_three_processes_taking_turns_lose_no_turn(tmp_path: Path) -> None:
    """Three processes acquire one key 200 times each in tight loops: every turn is taken and
    recorded once. (How evenly they alternate depends on the scheduler: it is a benchmark
    figure, not an assertion; the step-aside rule itself is checked below.)"""
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
    assert sorted(log.read_text()) == sorted("abc" * 200)  # every turn taken, none lost


def _wait_for_turn(directory: str, ready: object, done: object) -> None:
    locks = KeyedLock(FileBackend(directory))
    ready.set()  # type: ignore[attr-defined]
    with locks.sync("turn", timeout=60):
        done.set()  # type: ignore[attr-defined]


def test_a_releaser_steps_aside_for_a_waiting_process(tmp_path: Path) -> None:
    """A process that releases a key while another process is marked as waiting does not take
    it straight back: its next try fails until the other had a turn or 50 ms passed. This holds
    under any scheduling (the check allows the 50 ms), where a count of turns in a row does
    not. Without the step-aside, the releaser's immediate retry wins the OS lock at once."""
    directory = str(tmp_path / "locks")
    locks = KeyedLock(FileBackend(directory))
    path = Path(directory) / file_name("turn")
    for _ in range(3):
        holder = locks.acquire_sync("turn")
        ready, done = ctx.Event(), ctx.Event()
        waiter = ctx.Process(target=_wait_for_turn, args=(directory, ready, done))
        waiter.start()
        try:
            assert ready.wait(60)
            deadline = time.monotonic() + 60
            while not _marked_as_waiting(path):  # bounded poll: the waiter marked itself
                assert time.monotonic() < deadline, "the waiting process never marked itself"
            released_at = time.monotonic()
            holder.release_sync()
            while True:
                try:
                    again = locks.acquire_sync("turn", timeout=0)
                except LockTimeout:
                    if done.is_set():
                        break  # the other process had its turn: the rule held
                    continue
                waited = time.monotonic() - released_at
                assert done.is_set() or waited >= 0.05, (
                    f"took the key back after {waited * 1000:.1f} ms with a process waiting"
                )
                again.release_sync()
                break
        finally:
            waiter.join(60)
        assert waiter.exitcode == 0


def _marked_as_waiting(path: Path) -> bool:
    """Whether some process holds a waiting mark (a read lock on byte 1) on *path*: asked
    from a child, since this process's own locks never conflict with each other."""
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)\n"
        "except OSError:\n"
        "    print('marked')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "marked"
