"""What one process keeps per lock directory: the in-process tier in front of the OS locks,
the lock files it has open, its waiting callers, its waiting marks, and what a fork does with
them.

A key's lock file stays open after its release (at most IDLE_FILES of them per directory,
least recently released closed first), so the next acquire of the key skips open, fstat and
close: it still checks after locking that the file is the one at the key's path. An idle file
is never kept while a caller of this process waits on another file of the same key (closing
it would drop that caller's waiting mark, a POSIX lock of the process).

Fairness between processes: a process waiting for a key's OS lock holds a POSIX read lock on
byte 1 of the lock file (advisory: it guards nothing, it only says "waiting"; the OS drops it
when the process dies). A process releasing the key checks for such readers; if there are
any, its next acquire of the key steps aside until another process has taken a turn (the
file's token moved) or STEP_ASIDE passes. Without it the releasing process takes the key
straight back before the waiters the kernel woke at its unlock get to run: one process kept
it for whole seconds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ._filerecord import read_token
from ._tiered import Held, Tier

if TYPE_CHECKING:
    from ._waiters import Waiter

__all__ = [
    "IDLE_FILES",
    "PID",
    "SHARED",
    "SHARED_MUTEX",
    "STEP_ASIDE",
    "FileHeld",
    "Shared",
    "Waiting",
    "close_tracked",
    "done_waiting",
    "others_wait",
    "say_waiting",
    "try_flock",
    "unlock",
]

_WAITING_BYTE = 1
STEP_ASIDE = 0.05
IDLE_FILES = 128  # idle lock files kept open per process and directory
PID = [os.getpid()]  # this process's pid, for the records (os.getpid() is a syscall)


class FileHeld(Held):
    """The OS lock this process holds on one key, and the lease it belongs to."""

    __slots__ = ("fd", "timed")

    def __init__(
        self, fd: int, token: int, owner: bytes, local_token: int, *, timed: bool = False
    ) -> None:
        super().__init__(token, owner, local_token)
        self.fd = fd
        self.timed = timed  # its in-process turn has a deadline (it may lapse before release)


class Waiting:
    """This process's caller waiting for one key's OS lock: its own open file of the key (its
    own open file description, so its flock conflicts with every other one, ours included),
    and, once a thread blocks in flock on that file for it, how that flock ended."""

    __slots__ = ("blocked", "done", "error", "fd", "marked", "waiter")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.marked = False  # the waiting mark (a read lock on _WAITING_BYTE) is set
        self.blocked = False  # a thread blocks in flock(LOCK_EX) on fd: only it may use fd
        self.done = False  # that flock returned: fd holds the OS lock unless error
        self.error: Exception | None = None
        # the caller to wake when the flock returns; None once the caller gave up (the
        # thread then lets the lock go, unless another caller of this process took over)
        self.waiter: Waiter | None = None


class Shared(Tier):
    """Per process and lock directory: the in-process tier shared by every FileBackend on it
    (FIFO hand-off, TTL takeover and exclusion between tasks, threads and event loops of this
    process), so the OS lock only arbitrates between processes."""

    held: dict[str, FileHeld]  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()  # mutex also guards aside, waiting (and every Waiting), fds
        # key -> (token at our release, monotonic time until which we step aside)
        self.aside: dict[str, tuple[int, float]] = {}
        # key -> this process's wait for the key's OS lock (one at most: the in-process tier
        # lets one caller per key through; a wait whose caller gave up may linger in flock)
        self.waiting: dict[str, Waiting] = {}
        # every lock-file descriptor in use in this process (held, waiting or in a try), from
        # its open to its close or its return to idle: a fork (which waits for mutex) can then
        # close in the child each one the parent had open, even one between its flock and its
        # entry in held
        self.fds: set[int] = set()
        # key -> its lock file, open and unlocked, nobody's (oldest released first); a key's
        # file leaves it for a try or a wait and comes back at the release
        self.idle: dict[str, int] = {}
        # lock-file descriptor of a key (in fds or idle) -> (st_dev, st_ino) at its open
        self.ids: dict[int, tuple[int, int]] = {}
        weakref.finalize(self, _close_all, self.idle)

    def take_idle(self, key: str) -> int | None:
        """*key*'s idle open file, now in use (in fds), or None. Caller holds mutex."""
        fd = self.idle.pop(key, None)
        if fd is not None:
            self.fds.add(fd)
        return fd

    def keep_idle(self, key: str, fd: int) -> None:
        """*fd*, *key*'s unlocked file in use, is done with: keep it open for the key's next
        acquire, or close it (see the module's docstring)."""
        with self.mutex:
            self.fds.discard(fd)
            if key in self.waiting or key in self.idle or fd not in self.ids:
                self.ids.pop(fd, None)
                os.close(fd)
                return
            self.idle[key] = fd
            if len(self.idle) > IDLE_FILES:
                old = self.idle.pop(next(iter(self.idle)))  # (this very fd if IDLE_FILES is 0)
                self.ids.pop(old, None)
                os.close(old)

    def close_idle(self) -> None:
        """Close every idle file (prune, close, fork)."""
        with self.mutex:
            _close_all(self.idle, self.ids)

    def stepping_aside(self, key: str, fd: int) -> bool:
        """True while this process owes another process a turn at *key* (see STEP_ASIDE);
        *fd* is an open file of the key."""
        with self.mutex:
            aside = self.aside.get(key)
        if aside is None:
            return False
        token_then, until = aside
        if time.monotonic() < until and read_token(fd) == token_then:  # nobody took a turn yet
            return True
        with self.mutex:
            self.aside.pop(key, None)
        return False

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's leases and locks."""
        # A forked child inherits the parent's descriptors: closing them does not release the
        # parent's flock (filelock #634 came from unlocking instead), and the child must not
        # think it holds anything, or keep a parent's lock alive after the parent dies.
        for fd in [*self.fds, *self.idle.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.idle.clear()  # (its finalizer must not close them again)
        self.__init__()  # type: ignore[misc]  # (POSIX locks are not inherited either)


def _close_all(idle: dict[str, int], ids: dict[int, tuple[int, int]] | None = None) -> None:
    for fd in idle.values():
        if ids is not None:
            ids.pop(fd, None)
        try:
            os.close(fd)
        except OSError:  # (interpreter shutdown: nothing left to free)
            pass
    idle.clear()


SHARED: weakref.WeakValueDictionary[tuple[int, int], Shared] = weakref.WeakValueDictionary()
SHARED_MUTEX = threading.Lock()
_FORKING: list[Shared] = []  # the tiers whose mutex a fork in progress holds


def _before_fork() -> None:
    SHARED_MUTEX.acquire()
    _FORKING[:] = list(SHARED.values())
    for shared in _FORKING:
        shared.mutex.acquire()


def _after_fork_in_parent() -> None:
    for shared in _FORKING:
        shared.mutex.release()
    _FORKING.clear()
    SHARED_MUTEX.release()


def _after_fork_in_child() -> None:
    # in place: other modules hold this very lock object (imported by name)
    SHARED_MUTEX._at_fork_reinit()  # type: ignore[attr-defined]  # (as threading does)
    PID[0] = os.getpid()
    for shared in _FORKING:
        shared.reset_after_fork()
    _FORKING.clear()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def close_tracked(shared: Shared, fd: int) -> None:
    """Close the lock file *fd*, which ``shared.fds`` tracks (see fork)."""
    with shared.mutex:
        shared.fds.discard(fd)
        shared.ids.pop(fd, None)
        os.close(fd)


def try_flock(fd: int, how: int = fcntl.LOCK_EX) -> bool:
    """Take the flock *how* on *fd* without waiting; False if another open file holds it."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_waiting_byte(fd: int, mode: int) -> bool:
    """Take *mode* (LOCK_SH or LOCK_EX) on _WAITING_BYTE without waiting; False if another
    process's lock stands in the way."""
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB, 1, _WAITING_BYTE)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def say_waiting(fd: int) -> bool:
    """Mark this process as waiting for the key of *fd* (a read lock on _WAITING_BYTE); False
    if a releaser was probing at this very instant (the next poll tries again)."""
    return _lock_waiting_byte(fd, fcntl.LOCK_SH)


def done_waiting(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, _WAITING_BYTE)


# struct flock on Linux, for F_GETLK: l_type, l_whence, l_start, l_len, l_pid (then padding)
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = 32 if _FLOCK.size == 28 else _FLOCK.size  # (LP64: padded to 8 bytes)
_GETLK = sys.platform == "linux" and hasattr(fcntl, "F_GETLK")


def others_wait(fd: int) -> bool:
    """True if another process is marked as waiting for the key of *fd*: on Linux one F_GETLK
    (a question, which never makes a caller's say_waiting fail), elsewhere a probe lock."""
    if _GETLK:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _WAITING_BYTE, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query.ljust(_FLOCK_SIZE, b"\0"))
        return bool(_FLOCK.unpack_from(answer)[0] != fcntl.F_UNLCK)
    if not _lock_waiting_byte(fd, fcntl.LOCK_EX):
        return True
    done_waiting(fd)
    return False
