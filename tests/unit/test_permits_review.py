"""A hostile review of the in-process permits: each test names the defect it pins down, and
says whether it failed on main before the fix that accompanies it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import ItemsView

import pytest

from keylock import KeyedSemaphore
from keylock.backends import MemoryBackend
from keylock.backends.base import RW_LIMIT, ThreadWaiter

NO_OWNER = b""  # in-process: the token proves ownership


class ManualClock:
    """A clock the test steps by hand (the Clock protocol of keylock._clock)."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


async def _until(condition: object, within: float = 5.0) -> None:
    """Poll *condition* (a callable) until it is true; fail after *within* seconds."""
    assert callable(condition)
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_an_untimed_permit_given_a_ttl_by_extend_expires() -> None:
    """extend() of a permit granted without a TTL gives it a deadline; past it, its room goes
    to the next caller (took_over), as for locks. Failed on main: the table's count of timed
    holders was not raised by extend, so the expiry scan was skipped and the dead permit
    held its room until released (a waiter waited forever); its release then drove the count
    to -1, so a later timed permit's expiry was skipped in turn."""
    clock = ManualClock()
    view = MemoryBackend(clock=clock).permits(1)
    held = view._try_acquire("k", NO_OWNER, None, None)
    assert held is not None
    view.extend_sync("k", NO_OWNER, held[0], 1.0)
    clock.mono += 2.0
    after = view._try_acquire("k", NO_OWNER, None, None)
    assert after is not None, "the extended permit's TTL ran out: its room is free"
    assert after[3] is True  # took over an expired permit
    view.release_sync("k", NO_OWNER, after[0])
    # a later timed permit still expires (the count of timed holders is right)
    timed = view._try_acquire("k", NO_OWNER, 1.0, None)
    assert timed is not None
    clock.mono += 2.0
    last = view._try_acquire("k", NO_OWNER, None, None)
    assert last is not None
    view.release_sync("k", NO_OWNER, last[0])
    assert len(view) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("first_ttl", [None, 60.0])
async def test_a_waiter_wakes_when_extend_gives_the_holder_an_earlier_deadline(
    first_ttl: float | None,
) -> None:
    """A holder whose extend() makes it lapse sooner than the waiters were told (or lapse at
    all, if it had no TTL) re-arms the head of the line, as the lock path does: the waiter
    gets the permit when the new deadline passes. Failed on main: the head slept until its
    own timeout (or the holder's old deadline) before it looked again."""
    sem = KeyedSemaphore(limit=1)
    held = await sem.acquire("k", ttl=first_ttl)
    waiter = asyncio.create_task(sem.acquire("k", timeout=30))
    await _until(lambda: sem.statistics("k").waiting == 1)
    await held.extend(0.05)
    got = await asyncio.wait_for(waiter, 5)
    assert got.took_over
    await got.release()
    assert len(sem.backend.permits(1)) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("tiered", [False, True])
def test_a_forked_child_can_make_permit_views(tiered: bool) -> None:
    """A child forked while another thread of the parent was making a permit view can make
    views (memory, and a tiered backend's). Failed on main: the views' module lock was not
    reset in the child, which then hung in its first permits() call (here: killed after
    5 s)."""
    from keylock.backends import _permits, _tieredpermits

    class Parent:  # (what tiered_view reads of a tiered backend)
        default_ttl = None

    class View(_tieredpermits.TieredPermits):
        pass

    def make_view() -> object:
        if tiered:
            return _tieredpermits.tiered_view(Parent(), View, 2, 1)  # type: ignore[arg-type,type-abstract]
        return MemoryBackend().permits(2)

    module = _tieredpermits if tiered else _permits
    with module._VIEWS_MUTEX:  # (as a thread of the parent making a view at fork time)
        pid = os.fork()
        if pid == 0:
            make_view()
            os._exit(0)
    deadline = time.monotonic() + 5
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # (a bounded poll of the child)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung in permits()")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_readers_draining_before_a_waiting_writer_cost_linear_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each release of a reader while a writer waits at the head does O(1) work: the head is
    not re-armed (a scan of every holder for the first expiry) when it did not change, since a
    holder leaving only moves that expiry later. Failed on main: every release scanned all
    holders, so 8000 readers with a TTL draining before a writer took 2.0 s under the table's
    one mutex (0.036 s after), and here 1000 releases made 999 scans."""
    from keylock.backends import _permittable

    backend = MemoryBackend()
    read, write = backend.permits(RW_LIMIT, 1), backend.permits(RW_LIMIT, RW_LIMIT)
    readers = [read._try_acquire("k", NO_OWNER, 60.0, None) for _ in range(1000)]
    writer = ThreadWaiter(NO_OWNER, None)
    assert write._try_acquire("k", NO_OWNER, None, writer) is None
    scans = 0
    earliest = _permittable._earliest

    def counted(entry: list[object]) -> float:
        nonlocal scans
        scans += 1
        return earliest(entry)

    monkeypatch.setattr(_permittable, "_earliest", counted)
    for grant in readers:
        assert grant is not None
        read.release_sync("k", NO_OWNER, grant[0])
    assert scans <= 2
    assert writer.grant is not None  # the writer got the key once the last reader left
    write.release_sync("k", NO_OWNER, writer.grant[0])
    assert len(read) == 0  # type: ignore[arg-type]


def test_a_step_before_the_first_deadline_does_not_scan_the_holders() -> None:
    """A step on a key whose holders have TTLs scans them for expired ones only once the
    first of their deadlines may have passed. Failed on main: every step that could not
    take the uncontended path scanned every holder (and again for the head's retry time),
    so 8000 readers queueing behind a writer while 8000 held took 23 s under the table's
    one mutex (1.4 s after: what is left is the re-entry check, one look per holder)."""
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    read, write = backend.permits(RW_LIMIT, 1), backend.permits(RW_LIMIT, RW_LIMIT)
    readers = [read._try_acquire("k", NO_OWNER, 60.0, None) for _ in range(100)]
    writer = ThreadWaiter(NO_OWNER, None)
    assert write._try_acquire("k", NO_OWNER, None, writer) is None

    class Counted(dict[int, object]):
        scans = 0

        def items(self) -> ItemsView[int, object]:  # type: ignore[override]
            Counted.scans += 1
            return super().items()

    entry = read.table.keys["k"]  # type: ignore[attr-defined]
    entry[2] = Counted(entry[2])
    behind = [ThreadWaiter(NO_OWNER, None) for _ in range(100)]
    for waiter in behind:
        assert read._try_acquire("k", NO_OWNER, None, waiter) is None
        assert waiter.retry_at == 1060.0  # told when the first reader lapses
    assert Counted.scans == 0
    clock.mono += 61.0  # every reader lapsed: the next step finds them and serves the line
    assert read._try_acquire("k", NO_OWNER, None, None) is None  # (a try never passes them)
    assert Counted.scans == 1
    assert writer.grant is not None
    assert writer.grant[3] is True  # took over
    assert all(grant is not None for grant in readers)
    write.release_sync("k", NO_OWNER, writer.grant[0])
    for waiter in behind:
        assert waiter.grant is not None
        read.release_sync("k", NO_OWNER, waiter.grant[0])
    assert len(read) == 0  # type: ignore[arg-type]


def test_stale_guard_refuses_a_lock_that_is_not_exclusive() -> None:
    """stale_guard's premise (what the handler reads under the lock stays put) needs one
    holder at a time; KeyedSemaphore is a KeyedLock to the type checker, so a semaphore of
    limit 3 or an RW reader must be refused when the guard is made. Failed on main: both
    were accepted, and the guarded calls of one key ran three (or any number) at once."""
    from keylock import KeyedLock, KeyedRWLock, stale_guard

    rw = KeyedRWLock()
    for shared in (KeyedSemaphore(limit=3), rw.reader):
        with pytest.raises(TypeError, match="needs an exclusive lock"):
            stale_guard(shared, key=lambda: "k")
    for exclusive in (KeyedLock(), KeyedSemaphore(limit=1), rw.writer):
        stale_guard(exclusive, key=lambda: "k")


def test_keyedlock_over_a_permit_view_reports_its_holders() -> None:
    """KeyStatistics.holders reaches the caller of KeyedLock.statistics (a KeyedLock over a
    backend's permit view, as the docs describe a semaphore underneath). Failed on main:
    KeyedLock.statistics rebuilt the snapshot without it, so two holders showed as 0."""
    from keylock import KeyedLock

    locks = KeyedLock(MemoryBackend().permits(3), namespace="ns")
    with locks.sync("k"), locks.sync("k"):
        stats = locks.statistics("k")
        assert (stats.key, stats.held, stats.holders) == ("ns:k", True, 2)


def test_a_waiter_still_wakes_for_the_next_deadline_after_the_first_holder_left() -> None:
    """The first-deadline bound a key keeps may be early (its holder left first): a waiter
    told that early time looks again, finds the true next deadline, and gets the room when
    it passes. (A guard for the bound; held on main, which scanned every step.)"""
    clock = ManualClock()
    view = MemoryBackend(clock=clock).permits(2)
    first = view._try_acquire("k", NO_OWNER, 1.0, None)
    second = view._try_acquire("k", NO_OWNER, 5.0, None)
    assert first is not None
    assert second is not None
    view.release_sync("k", NO_OWNER, first[0])
    third = view._try_acquire("k", NO_OWNER, None, None)
    assert third is not None
    waiter = ThreadWaiter(NO_OWNER, None)
    assert view._try_acquire("k", NO_OWNER, None, waiter) is None
    assert waiter.retry_at <= 1005.0  # never later than the true first deadline
    clock.mono = max(clock.mono, waiter.retry_at)
    while (grant := view._try_acquire("k", NO_OWNER, None, waiter)) is None:  # as woken
        assert waiter.retry_at > clock.mono  # (each look learns a later time)
        assert waiter.retry_at <= 1005.0
        clock.mono = waiter.retry_at
    assert clock.mono == 1005.0  # granted when the second holder lapsed, not later
    assert grant[3] is True  # took over
    view._withdraw("k", waiter)  # (as the driver does after its own step granted)
    for token in (third[0], grant[0]):
        view.release_sync("k", NO_OWNER, token)
    assert len(view) == 0  # type: ignore[arg-type]


def test_the_rw_lock_shows_its_observer_as_keyedlock_does() -> None:
    """KeyedRWLock has KeyedLock's surface, ``observer`` included. Failed on main:
    AttributeError."""
    from keylock import KeyedRWLock
    from keylock.observe import Observer

    observer = Observer()
    assert KeyedRWLock(observer=observer).observer is observer
    assert KeyedRWLock().observer is None
