"""FileBackend semaphores and RW locks between real processes (multiprocessing, fork): a
witness outside keylock counts holders in a shared file; a killed holder's permit is freed by
the OS; a stopped one keeps it; a waiting writer keeps later readers out of every process; a
waiter that gives up leaves nothing that blocks another process."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keylock import KeyedLock, LimitMismatch, LockTimeout
from keylock.backends import FileBackend
from keylock.backends._fileshared import STEP_ASIDE
from keylock.backends.base import RW_LIMIT
from keylock.backends.file import file_name

from .._poll import until

ctx = multiprocessing.get_context("fork")


# ------------------------------------------------------------------------------ the witness


class Witness:
    """Counts holders in a shared file, under its own lockf: ``readers writers max_readers
    violations``, and the tokens in the order holders entered."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.log = path + ".log"

    def _update(self, change: Callable[[list[int]], None]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 200, 0).split()
            state = [int(x) for x in raw] if raw else [0, 0, 0, 0]
            change(state)
            os.ftruncate(fd, 0)
            os.pwrite(fd, " ".join(map(str, state)).encode(), 0)
        finally:
            os.close(fd)

    def enter(self, writer: bool, limit: int, token: int | None = None) -> None:
        def change(state: list[int]) -> None:
            readers, writers = state[0], state[1]
            if writer:
                writers += 1
                state[3] += writers > 1 or readers > 0
            else:
                readers += 1
                state[3] += writers > 0 or readers > limit
            state[0], state[1], state[2] = readers, writers, max(state[2], readers)
            if token is not None:
                with open(self.log, "a") as fh:
                    fh.write(f"{'w' if writer else 'r'} {token}\n")

        self._update(change)

    def leave(self, writer: bool) -> None:
        def change(state: list[int]) -> None:
            state[1 if writer else 0] -= 1

        self._update(change)

    def state(self) -> list[int]:
        with open(self.path) as fh:
            return [int(x) for x in fh.read().split()]

    def tokens(self) -> list[tuple[str, int]]:
        with open(self.log) as fh:
            return [(line.split()[0], int(line.split()[1])) for line in fh]


def _hold_briefly() -> None:
    time.sleep(0.001)  # a hold long enough for holders to overlap (it widens the check)


def _semaphore_worker(directory: str, witness: str, limit: int, rounds: int, real: bool) -> None:
    locks = KeyedLock(FileBackend(directory).permits(limit))
    seen = Witness(witness)
    for _ in range(rounds):
        if real:
            with locks.sync("hot") as lease:
                seen.enter(False, limit, lease.token)
                _hold_briefly()
                seen.leave(False)
        else:
            seen.enter(False, limit)
            _hold_briefly()
            seen.leave(False)


def _run(target: Callable[..., None], args_list: list[tuple[object, ...]]) -> None:
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0


@pytest.mark.parametrize("real", [True, False], ids=["keylock", "naive"])
def test_six_processes_never_exceed_a_limit_of_three(tmp_path: Path, real: bool) -> None:
    """6 processes x 40 rounds on a semaphore of limit 3: the witness never counts more than
    3 holders, and counts more than 1 (a semaphore, not a mutex). The naive run (no
    semaphore) does count more than 3, which proves the witness can see a violation."""
    witness = str(tmp_path / "witness")
    args = (str(tmp_path / "locks"), witness, 3, 40, real)
    _run(_semaphore_worker, [args] * 6)
    _, _, most, violations = Witness(witness).state()
    if real:
        assert violations == 0
        assert 1 < most <= 3
        tokens = [token for _, token in Witness(witness).tokens()]
        assert len(set(tokens)) == len(tokens) == 240  # never reused
    else:
        assert violations > 0
        assert most > 3


def _rw_worker(directory: str, witness: str, writer: bool, rounds: int) -> None:
    backend = FileBackend(directory)
    locks = KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT if writer else 1))
    seen = Witness(witness)
    for _ in range(rounds):
        with locks.sync("doc") as lease:
            seen.enter(writer, RW_LIMIT, lease.token)
            _hold_briefly()
            seen.leave(writer)


def test_rw_processes_never_put_a_reader_beside_a_writer(tmp_path: Path) -> None:
    """4 reader and 2 writer processes x 30 rounds: the witness never sees a writer beside
    anyone, readers do share, and each writer's token is above every token that entered
    before it (strictly increasing across modes, never reused)."""
    witness = str(tmp_path / "witness")
    directory = str(tmp_path / "locks")
    _run(_rw_worker, [(directory, witness, w, 30) for w in (False,) * 4 + (True,) * 2])
    _, _, most, violations = Witness(witness).state()
    assert violations == 0
    assert most > 1
    log = Witness(witness).tokens()
    assert len({token for _, token in log}) == len(log) == 180
    for at, (mode, token) in enumerate(log):
        if mode == "w":
            assert all(token > before for _, before in log[:at])


# ------------------------------------------------------------------------ crashes and stops


def _hold(directory: str, limit: int, weight: int, count: int, key: str, ready: object) -> None:
    locks = KeyedLock(FileBackend(directory).permits(limit, weight))
    held = [locks.acquire_sync(key) for _ in range(count)]
    ready.set()  # type: ignore[attr-defined]
    time.sleep(600)
    del held


def _start_holder(directory: str, limit: int, weight: int, count: int, key: str) -> object:
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(directory, limit, weight, count, key, ready))
    proc.start()
    assert ready.wait(30)
    return proc


@pytest.mark.parametrize(
    ("limit", "weight", "count"),
    [(2, 1, 2), (RW_LIMIT, RW_LIMIT, 1), (RW_LIMIT, 1, 3)],
    ids=["semaphore", "writer", "readers"],
)
def test_a_killed_holders_permits_are_freed_by_the_os(
    tmp_path: Path, limit: int, weight: int, count: int
) -> None:
    """A process holding every permit it can is SIGKILLed: the OS frees its permits, and a
    waiter in another process gets them promptly (no TTL involved); an exclusive slot left
    unreleased tells its next holder it took over."""
    directory = str(tmp_path)
    holder = _start_holder(directory, limit, weight, count, "crash")
    writer = KeyedLock(FileBackend(directory).permits(limit, limit))  # wants all of it
    try:
        with pytest.raises(LockTimeout):
            writer.acquire_sync("crash", timeout=0)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    lease = writer.acquire_sync("crash", timeout=60)
    assert lease.took_over is True  # (after dead readers: False before the readers' count)
    lease.release_sync()
    holder.join(10)  # type: ignore[attr-defined]
    again = writer.acquire_sync("crash", timeout=0)
    assert again.took_over is False  # released cleanly: told once
    again.release_sync()


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "beside-a-live-reader"])
def test_a_reader_after_a_dead_reader_is_told_it_took_over(tmp_path: Path, alone: bool) -> None:
    """Readers of a process are SIGKILLed: the next reader, holding alone, is told it took
    over (once); a reader granted beside a live reader is not (its room was not the dead
    one's), and the next one alone is. Readers that released cleanly tell nobody. (Before
    the readers' count, .rw recorded only writers: False in every case.)"""
    directory = str(tmp_path)
    reader = KeyedLock(FileBackend(directory).permits(RW_LIMIT))
    for _ in range(2):
        lease = reader.acquire_sync("doc", timeout=0)
        assert lease.took_over is False
        lease.release_sync()
    holder = _start_holder(directory, RW_LIMIT, 1, 2, "doc")
    live = None if alone else _start_holder(directory, RW_LIMIT, 1, 1, "doc")
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    holder.join(10)  # type: ignore[attr-defined]
    lease = reader.acquire_sync("doc", timeout=60)
    assert lease.took_over is alone
    lease.release_sync()
    if live is not None:
        os.kill(live.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        live.join(10)  # type: ignore[attr-defined]
        lease = reader.acquire_sync("doc", timeout=60)
        assert lease.took_over is True  # the dead readers and the terminated one
        lease.release_sync()
    lease = reader.acquire_sync("doc", timeout=0)
    assert lease.took_over is False
    lease.release_sync()


def test_a_stopped_holder_keeps_its_permit_until_it_dies(tmp_path: Path) -> None:
    """A SIGSTOPped holder is alive: its permit is not given to anyone (a waiter times out),
    whatever the wait; once it is killed, the permit is free."""
    directory = str(tmp_path)
    holder = _start_holder(directory, 1, 1, 1, "stopped")
    os.kill(holder.pid, signal.SIGSTOP)  # type: ignore[attr-defined]
    try:
        locks = KeyedLock(FileBackend(directory).permits(1))
        with pytest.raises(LockTimeout):
            locks.acquire_sync("stopped", timeout=0.3)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    locks.acquire_sync("stopped", timeout=60).release_sync()
    holder.join(10)  # type: ignore[attr-defined]


def test_a_limit_mismatch_between_processes_grants_nothing(tmp_path: Path) -> None:
    """A process holds a key as a semaphore of limit 2: another asking for limit 3 gets
    LimitMismatch (nothing granted, nothing left); once the holder died the record is gone
    and limit 3 is granted."""
    directory = str(tmp_path)
    holder = _start_holder(directory, 2, 1, 1, "limit")
    other = KeyedLock(FileBackend(directory).permits(3))
    try:
        for timeout in (0, 1.0):
            with pytest.raises(LimitMismatch) as raised:
                other.acquire_sync("limit", timeout=timeout)
            assert raised.value.key == "limit"
            assert "limit 2" in str(raised.value)
            assert "limit 3" in str(raised.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    holder.join(10)  # type: ignore[attr-defined]
    leases = [other.acquire_sync("limit", timeout=0) for _ in range(3)]
    for lease in leases:
        lease.release_sync()


# ---------------------------------------------------------------- fairness and leaving


def _try_read(directory: str, key: str, timeout: float, results: object) -> None:
    locks = KeyedLock(FileBackend(directory).permits(RW_LIMIT))
    try:
        locks.acquire_sync(key, timeout=timeout).release_sync()
        results.put("acquired")  # type: ignore[attr-defined]
    except LockTimeout:
        results.put("LockTimeout")  # type: ignore[attr-defined]


def _reader_in_another_process(directory: str, key: str, timeout: float) -> str:
    results = ctx.Queue()
    proc = ctx.Process(target=_try_read, args=(directory, key, timeout, results))
    proc.start()
    outcome = results.get(timeout=60)
    proc.join(10)
    assert isinstance(outcome, str)
    return outcome


def _in_line(directory: str, key: str) -> int:
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


def test_a_waiting_writer_keeps_later_readers_of_other_processes_out(tmp_path: Path) -> None:
    """A reader process holds; a writer here waits; a reader arriving in a third process
    after it does not get in beside the first (FIFO across modes), even with time to wait;
    when the first reader leaves, the writer gets the key, then the late reader."""
    directory = str(tmp_path)
    holder = _start_holder(directory, RW_LIMIT, 1, 1, "doc")
    writer = KeyedLock(FileBackend(directory).permits(RW_LIMIT, RW_LIMIT))
    got: list[object] = []
    thread = threading.Thread(
        target=lambda: got.append(writer.acquire_sync("doc", timeout=60)), daemon=True
    )
    thread.start()
    try:
        until(lambda: _in_line(directory, "doc") == 1, "the writer waits in line")
        assert _reader_in_another_process(directory, "doc", 0.3) == "LockTimeout"
        assert _reader_in_another_process(directory, "doc", 0) == "LockTimeout"
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    thread.join(60)
    assert got
    got[0].release_sync()  # type: ignore[attr-defined]
    assert _reader_in_another_process(directory, "doc", 0) == "acquired"
    holder.join(10)  # type: ignore[attr-defined]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_writer_that_gives_up_leaves_nothing_that_blocks_readers(
    tmp_path: Path, flavour: str
) -> None:
    """A writer times out behind a reader of another process: at once, a reader of a third
    process is let in beside the first (the writer left the gate, no thread of it blocks
    anyone), and this process has no permit file open."""
    directory = str(tmp_path)
    holder = _start_holder(directory, RW_LIMIT, 1, 1, "doc")
    backend = FileBackend(directory)
    writer = KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT))
    give_up: Callable[[], object] = (
        (lambda: writer.acquire_sync("doc", timeout=0.2))
        if flavour == "sync"
        else (lambda: asyncio.run(writer.acquire("doc", timeout=0.2)))
    )
    with pytest.raises(LockTimeout):
        give_up()
    try:
        assert _reader_in_another_process(directory, "doc", 0) == "acquired"
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    holder.join(10)  # type: ignore[attr-defined]
    # the writer's thread, still in flock when it gave up, lets the lock go as it comes
    until(lambda: not backend._shared.fds, "the pool thread closed the writer's file")
    writer.acquire_sync("doc", timeout=0).release_sync()


def test_two_processes_with_room_to_spare_never_wait_for_each_other(tmp_path: Path) -> None:
    """Two processes cycle for 0.5 s on a semaphore of limit 4 (the bench's harness and
    witness): there is always room, so neither should wait. Each releaser steps aside for a
    process marked waiting at the gate; when a process stepping aside marked itself waiting,
    the two stepped aside for each other until STEP_ASIDE (50 ms) ran out: 18 waits of that
    length in 0.5 s, ~400 acquisitions instead of ~9,000 (fails before the fix)."""
    from keylock._bench import filepermits
    from keylock._bench.contend import run_processes

    witness = filepermits._CountingWitness(4)

    def make() -> tuple[Callable[[int], object], filepermits._CountingWitness]:
        sem = KeyedLock(FileBackend(str(tmp_path)).permits(4))
        return (lambda key: sem.sync("room")), witness

    run = run_processes(make, [[0], [0]], 0.5)  # type: ignore[arg-type]
    assert run.violations == 0
    stalls = [wait for wait in run.waits if wait > 0.8 * STEP_ASIDE]
    assert len(stalls) <= 2, f"{len(stalls)} waits of a step-aside with room to spare"


def _prune_until(directory: str, stop: object, pruned: object) -> None:
    backend = FileBackend(directory)
    while not stop.is_set():  # type: ignore[attr-defined]
        pruned.value += backend.prune()  # type: ignore[attr-defined]


def test_prune_in_a_loop_never_lets_a_fourth_holder_in(tmp_path: Path) -> None:
    """Six processes cycle on a semaphore of limit 3 while a seventh prunes the directory
    in a loop: the witness never counts more than 3 holders, tokens never repeat, and the
    pruner did remove files between the cycles (a claim that opened a gate file as it was
    pruned opens the new one)."""
    witness = str(tmp_path / "witness")
    directory = str(tmp_path / "locks")
    FileBackend(directory)  # (the directory, before the pruner looks at it)
    stop, pruned = ctx.Event(), ctx.Value("q", 0)
    pruner = ctx.Process(target=_prune_until, args=(directory, stop, pruned))
    pruner.start()
    try:
        _run(_semaphore_worker, [(directory, witness, 3, 40, True)] * 6)
    finally:
        stop.set()
        pruner.join(60)
    _, _, most, violations = Witness(witness).state()
    assert violations == 0
    assert 1 <= most <= 3
    tokens = [token for _, token in Witness(witness).tokens()]
    assert len(set(tokens)) == len(tokens) == 240
    assert pruned.value > 0
