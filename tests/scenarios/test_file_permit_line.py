"""FileBackend permits between real processes (multiprocessing, fork) are granted in arrival
order, across processes and modes: each waiter arrives (takes its place in line) only after
the one before it did, and the tokens (minted in grant order) follow that order. A waiter
killed in line is skipped; nobody waits for it."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import pytest

from keylock import KeyedLock
from keylock.backends import FileBackend
from keylock.backends.base import RW_LIMIT
from keylock.backends.file import file_name

from .._poll import until

ctx = multiprocessing.get_context("fork")


def in_line(directory: str, key: str) -> int:
    """How many claims wait in *key*'s line: ticket files (``<base>.t<n>``) a claim locks."""
    prefix = file_name(key)[: -len(".lock")] + ".t"
    waiting = 0
    for name in os.listdir(directory):
        if not name.startswith(prefix):
            continue
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting += 1
        finally:
            os.close(fd)
    return waiting


def _hold(
    directory: str, limit: int, weight: int, key: str, ready: object, go: object, log: str
) -> None:
    """Hold, and once told, release and come straight back as ``z`` (arriving last)."""
    locks = KeyedLock(FileBackend(directory).permits(limit, weight))
    lease = locks.acquire_sync(key)
    ready.set()  # type: ignore[attr-defined]
    go.wait(120)  # type: ignore[attr-defined]
    lease.release_sync()
    lease = locks.acquire_sync(key, timeout=120)
    with open(log, "a") as fh:
        fh.write(f"{lease.token} z\n")
    lease.release_sync()


def _wait_in_line(
    directory: str, limit: int, weight: int, key: str, name: str, log: str, hold: float
) -> None:
    lease = KeyedLock(FileBackend(directory).permits(limit, weight)).acquire_sync(key, timeout=120)
    with open(log, "a") as fh:
        fh.write(f"{lease.token} {name}\n")
    time.sleep(hold)  # (a hold, so the next ones queue behind it: not a wait for a condition)
    lease.release_sync()


def _line_up(
    tmp_path: Path,
    limit: int,
    holder_weight: int,
    waiters: list[tuple[str, int]],
    kill: str = "",
    stop: str = "",
) -> list[str]:
    """A holder of *holder_weight* holds; *waiters* ``(name, weight)`` arrive one by one in
    separate processes (each once the one before it is in line); *kill* is SIGKILLed in line,
    *stop* SIGSTOPped (and let go on once the first waiter was granted, and the others had
    0.3 s to pass it); then the holder lets go and comes straight back as ``z``. The names in
    the order the waiters were granted."""
    directory, log = str(tmp_path / "locks"), str(tmp_path / "log")
    ready, go = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(directory, limit, holder_weight, "k", ready, go, log))
    holder.start()
    assert ready.wait(60)
    procs = {}
    for count, (name, weight) in enumerate(waiters, 1):
        args = (directory, limit, weight, "k", name, log, 0.02)
        procs[name] = proc = ctx.Process(target=_wait_in_line, args=args)
        proc.start()
        until(lambda count=count: in_line(directory, "k") == count, f"{name} is in line")
    if kill:
        os.kill(procs[kill].pid, signal.SIGKILL)  # type: ignore[arg-type]
        procs.pop(kill).join(30)
    if stop:
        os.kill(procs[stop].pid, signal.SIGSTOP)  # type: ignore[arg-type]
    go.set()
    if stop:
        until(lambda: os.path.exists(log), "the first waiter is granted")
        time.sleep(0.3)  # an observation window: the others pass a stopped one here, or not
        os.kill(procs[stop].pid, signal.SIGCONT)  # type: ignore[arg-type]
    holder.join(60)
    for proc in procs.values():
        proc.join(120)
        assert proc.exitcode == 0
    with open(log) as fh:
        granted = sorted((int(token), name) for token, name in (line.split() for line in fh))
    return [name for _, name in granted]


def test_semaphore_waiters_of_many_processes_are_served_in_arrival_order(
    tmp_path: Path,
) -> None:
    """Six processes queue behind a holder of a limit-1 semaphore, which then comes back:
    granted in the order they arrived. Before the line, the kernel picked which process
    waiting at the gate woke first (the old code failed it 1 run in 4: b, a, c, ...)."""
    names = ["a", "b", "c", "d", "e", "f"]
    assert _line_up(tmp_path, 1, 1, [(name, 1) for name in names]) == [*names, "z"]


def test_readers_and_writers_of_many_processes_are_served_in_arrival_order(
    tmp_path: Path,
) -> None:
    """A writer holds an RW lock; readers and writers of six processes queue: the tokens
    follow their arrival, across modes (the old code passed it when the kernel happened to
    wake them in order: see the test with a stopped waiter for a decisive one)."""
    waiters = [("r1", 1), ("w1", RW_LIMIT), ("r2", 1), ("r3", 1), ("w2", RW_LIMIT), ("r4", 1)]
    got = _line_up(tmp_path, RW_LIMIT, RW_LIMIT, waiters)
    assert got == [*(name for name, _ in waiters), "z"]


@pytest.mark.parametrize("kill", ["b", "a"])
def test_a_waiter_killed_in_line_is_skipped(tmp_path: Path, kill: str) -> None:
    """A waiter SIGKILLed while in line (the first, or one in the middle) never blocks the
    line: the others are granted, in arrival order, and its ticket file is swept (the old
    code failed the middle case at times: the releaser came back before d)."""
    names = ["a", "b", "c", "d"]
    got = _line_up(tmp_path, 1, 1, [(name, 1) for name in names], kill=kill)
    assert got == [*(name for name in names if name != kill), "z"]
    KeyedLock(FileBackend(str(tmp_path / "locks")).permits(1)).acquire_sync(
        "k", timeout=0
    ).release_sync()
    assert not [n for n in os.listdir(tmp_path / "locks") if re.search(r"\.t\d+$", n)]


def test_a_waiter_slow_to_wake_keeps_its_place(tmp_path: Path) -> None:
    """The second of four waiters is SIGSTOPped (a process the scheduler does not run when
    its turn comes): the ones behind it wait for it, and all are served in arrival order.
    Before the line, the kernel woke every process waiting at the gate and the first to run
    took it: c and d passed the stopped b (fails on the old code, every run)."""
    names = ["a", "b", "c", "d"]
    assert _line_up(tmp_path, 1, 1, [(name, 1) for name in names], stop="b") == [*names, "z"]
