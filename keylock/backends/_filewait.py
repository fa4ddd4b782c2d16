"""How a caller waits for another process's OS lock on a key: in a blocking flock, so the
kernel wakes it at the holder's unlock, instead of polling.

A blocking flock cannot be interrupted without a signal, so a caller with a deadline (or on
an event loop) does not make it: a thread of a small per-process pool does, on the caller's
own open file of the key (see :class:`~._fileshared.Waiting`), then wakes the caller. The
caller waits on its own waiter, bounded by its deadline, and is free to give up: its flock
then stays with the thread until the holder lets go, and a lock granted to nobody is released
at once, or taken over by the next caller of this process for the key (the in-process tier
lets one through at a time, so one flock per key and process at most waits in the kernel). A
sync caller without a deadline, which could only give up on a signal, waits in flock itself.
Only when the pool is full does a caller poll instead.
"""

from __future__ import annotations

import collections
import fcntl
import math
import os
import threading
import time
from typing import TYPE_CHECKING

from ._fileshared import close_tracked, done_waiting, unlock
from ._tiered import Flow, Step
from .base import Grant

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._fileshared import Shared, Waiting

__all__ = ["BLOCKED", "LEAVE", "LOOK", "TRY", "UNMARKED", "FileFlow", "block", "leave", "take_turn"]

# trips of a FileFlow
TRY = "try"  # take the OS lock, or have a thread wait for it in flock
LOOK = "look"  # the same, but start no thread: the caller's deadline has come
LEAVE = "leave"  # the caller gave up

# replies to TRY and LOOK besides a Grant and None (busy: poll)
BLOCKED = "blocked"  # a thread waits in flock for the caller, who waits to be woken
UNMARKED = "unmarked"  # the same, but the waiting mark is not set yet: look again soon

_FIRST_POLL = 0.00005  # seconds before the first retry of a busy OS lock; doubles each time
_MAX_POLL = 0.002  # the longest pause between two polls
_IDLE = 2.0  # seconds a pool thread waits for another flock before it ends
_MAX_THREADS = 256  # threads blocked in flock per process at most; callers beyond them poll


class FileFlow(Flow):
    """One acquire at the OS lock: TRY; if a thread now waits in flock for it (BLOCKED), wait
    until woken and look again; if busy otherwise (pool full, or not yet marked as waiting),
    look again after a pause doubling from 50 µs to 2 ms. The last look falls on the
    deadline."""

    _pause = 0.0  # the last pause between two polls
    _wait: float | None = 0.0  # how long to wait before the next trip (None: until woken)

    def next(self, now: float) -> Step | None:
        if self.grant is not None:
            return None
        wait, self._wait = self._wait, 0.0  # after any wait (woken or not): look again
        if wait is not None and wait <= 0.0:
            return Step(TRY if now < self.deadline.at else LOOK, None)
        return Step(None, wait)

    def on_reply(self, reply: object, now: float) -> None:
        if reply is not None and reply is not BLOCKED and reply is not UNMARKED:
            assert isinstance(reply, Grant)
            self.grant = reply
            return
        if self.deadline.passed(now):
            raise self.deadline.expired()
        left = self.deadline.at - now
        if reply is BLOCKED:
            self._pause = 0.0
            self._wait = None if left == math.inf else left
            return
        self._pause = min(self._pause * 2, _MAX_POLL) if self._pause else _FIRST_POLL
        self._wait = min(self._pause, left)

    def leaving(self) -> object | None:
        return LEAVE


def take_turn(fd: int, aside: Callable[[], bool] | None, wanted: Callable[[], bool]) -> None:
    """Block in flock(LOCK_EX) on *fd* until it holds the lock (EINTR is retried: PEP 475).

    With *aside* (true while this process still owes another one a turn), a lock taken before
    that other process had its turn is given back at once and tried again after a pause (from
    a bare yield up to 2 ms), unless it is no longer *wanted*: the process the kernel woke at
    our unlock needs CPU time to take the lock, and our retry must not beat it to it."""
    pause = 0.0
    while True:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if aside is None or not wanted() or not aside():
            return
        unlock(fd)
        if pause:
            time.sleep(pause)
        else:  # a woken process that shares our CPU runs now
            os.sched_yield()
        pause = min(pause * 2, _MAX_POLL) if pause else _FIRST_POLL


def leave(shared: Shared, key: str) -> None:
    """The caller waiting for *key* gave up: close its file (which drops its waiting mark),
    or, if a thread still waits in flock on it, leave the file to that thread, unmarked."""
    with shared.mutex:
        wait = shared.waiting.get(key)
        if wait is None:
            return
        if wait.blocked and not wait.done:
            wait.waiter = None  # the thread lets the lock go when it comes
            if wait.marked:  # nobody should step aside for a caller who left
                done_waiting(wait.fd)
                wait.marked = False
            return
        del shared.waiting[key]
    try:
        if wait.done and wait.error is None:  # granted as the caller gave up: pass it on
            unlock(wait.fd)
    finally:
        close_tracked(shared, wait.fd)


def block(shared: Shared, key: str, wait: Waiting, aside: Callable[[], bool] | None) -> bool:
    """Have a pool thread take the turn in flock on ``wait.fd`` (see :func:`take_turn`),
    then hand the lock to ``wait.waiter``, or let it go if nobody wants it any more; False if
    the pool is full. The caller set ``wait.blocked``: only that thread touches ``wait.fd``."""
    return _POOL.submit(lambda: _wait_in_flock(shared, key, wait, aside))


def _wait_in_flock(
    shared: Shared, key: str, wait: Waiting, aside: Callable[[], bool] | None
) -> None:
    error: Exception | None = None
    try:
        take_turn(wait.fd, aside, lambda: wait.waiter is not None)
    except Exception as exc:  # the caller raises it
        error = exc
    with shared.mutex:
        wait.done, wait.error = True, error
        waiter = wait.waiter
        if waiter is None:  # the caller gave up: the lock is nobody's (one decision, here)
            del shared.waiting[key]
    if waiter is not None:
        if waiter.wake():
            return  # the caller comes back for the lock, or gives up and lets it go
        with shared.mutex:  # its event loop is closed: it will never come back
            if shared.waiting.get(key) is not wait:
                return
            del shared.waiting[key]
    # granted to nobody: pass it on
    try:
        if error is None:
            unlock(wait.fd)
    finally:
        close_tracked(shared, wait.fd)


class _Pool:
    """Threads that each run one blocking call at a time; an idle one ends after _IDLE s."""

    def __init__(self) -> None:
        self.ready = threading.Condition(threading.Lock())
        self.jobs: collections.deque[Callable[[], None]] = collections.deque()
        self.threads = 0
        self.idle = 0

    def submit(self, job: Callable[[], None]) -> bool:
        with self.ready:
            self.jobs.append(job)
            if self.idle > len(self.jobs) - 1:  # an idle thread takes it
                self.ready.notify()
                return True
            if self.threads >= _MAX_THREADS:
                self.jobs.pop()
                return False
            self.threads += 1
        try:
            threading.Thread(target=self._run, name="keylock-flock", daemon=True).start()
        except RuntimeError:  # the OS refused a thread: the caller polls instead
            with self.ready:
                self.threads -= 1
                try:
                    self.jobs.remove(job)
                except ValueError:  # another thread took it meanwhile
                    return True
            return False
        return True

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.jobs:
                    self.idle += 1
                    woken = self.ready.wait(_IDLE)
                    self.idle -= 1
                    if not woken and not self.jobs:
                        self.threads -= 1
                        return
                job = self.jobs.popleft()
            try:
                job()
            except BaseException:  # (a bug: threading's excepthook reports it)
                with self.ready:
                    self.threads -= 1
                raise


_POOL = _Pool()


def _after_fork_in_child() -> None:
    # the child has none of the parent's threads (nor its blocked flocks: Shared resets)
    _POOL.__init__()  # type: ignore[misc]


os.register_at_fork(after_in_child=_after_fork_in_child)
