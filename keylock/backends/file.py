"""Leases between processes on one host: one lock file per key, locked with portalocker (flock).

Layout of ``directory`` (created with mode 0o700 if missing, 0o2770 with ``mode="group"``): one
file per key, named ``<readable>.<hash>.lock``, where *readable* keeps the key's
``[A-Za-z0-9._-]`` characters (at most 64, others become ``_``, leading dots dropped) and *hash*
is 32 hex digits (128 bits) of the key's SHA-256, so two keys never share a file and no key can
name a path outside the directory (no ``/``, no ``..``, no NUL, bounded length). Each file holds
one record, rewritten by each holder under the lock: ``token pid expires_at owner``, then the
key. Paths, modes and the record live in :mod:`keylock.backends._filepaths`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import threading
import time
import weakref
from dataclasses import dataclass

import portalocker

from ..errors import LeaseLost
from ._filepaths import (
    LockDirectory,
    Mode,
    check_directory,
    file_name,
    read_record,
    read_token,
    write_record,
)
from .base import Backend, Grant, KeyStatistics, Waiter, _timeout
from .memory import MemoryBackend

__all__ = ["FileBackend", "file_name"]

_FIRST_POLL = 0.0005  # seconds before the first retry of a busy OS lock; doubles each time
_MAX_POLL = 0.002  # the longest wait between retries (another process holds the key)
# Fairness between processes. A process waiting for a key's OS lock holds a POSIX read lock on
# byte 1 of the lock file (advisory: it guards nothing, it only says "waiting"; the OS drops it
# when the process dies). A process releasing the key checks for such readers; if there are
# any, its next acquire of the key steps aside until another process has taken a turn (the
# file's token moved) or _STEP_ASIDE passes. Without it the releasing process takes the key
# straight back while the others sleep between polls: one process kept it for whole seconds.
_WAITING_BYTE = 1
_STEP_ASIDE = 0.05
_LOCK_NB = portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING


@dataclass
class _Held:
    """The OS lock this process holds on one key, and the lease it belongs to."""

    fd: int
    token: int  # the lease's fencing token (from the lock file)
    owner: bytes
    local_token: int  # the in-process layer's token for the same lease
    pid: int  # the process that took the OS lock


class _Shared:
    """Per process and lock directory: the in-process layer shared by every FileBackend on it.

    ``local`` (a MemoryBackend) gives FIFO hand-off, TTL takeover and exclusion between tasks,
    threads and event loops of this process, so the OS lock only arbitrates between processes.
    """

    def __init__(self) -> None:
        self.local = MemoryBackend()
        self.mutex = threading.Lock()  # guards held, aside, waiting
        self.held: dict[str, _Held] = {}  # key -> OS lock held by this process
        # key -> (token at our release, monotonic time until which we step aside)
        self.aside: dict[str, tuple[int, float]] = {}
        # key -> (open file, marked as waiting yet) of this process's caller waiting for the key
        self.waiting: dict[str, tuple[int, bool]] = {}

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's leases and locks."""
        # A forked child inherits the parent's descriptors: closing them does not release the
        # parent's flock (filelock #634 came from unlocking instead), and the child must not
        # think it holds anything.
        fds = [held.fd for held in self.held.values()] + [fd for fd, _ in self.waiting.values()]
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.local = MemoryBackend()
        self.mutex = threading.Lock()
        self.held = {}
        self.aside = {}
        self.waiting = {}  # (POSIX locks are not inherited: the child waits for nothing)


_SHARED: weakref.WeakValueDictionary[tuple[int, int], _Shared] = weakref.WeakValueDictionary()
_SHARED_MUTEX = threading.Lock()


def _after_fork_in_child() -> None:
    global _SHARED_MUTEX
    _SHARED_MUTEX = threading.Lock()
    for shared in list(_SHARED.values()):
        shared.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


def _say_waiting(fd: int) -> bool:
    """Mark this process as waiting for the key of *fd* (a read lock on _WAITING_BYTE); False
    if a releaser was probing at this very instant (the next poll tries again)."""
    return _lock_waiting_byte(fd, fcntl.LOCK_SH)


def _done_waiting(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, _WAITING_BYTE)


def _others_wait(fd: int) -> bool:
    """True if another process is marked as waiting for the key of *fd*."""
    if not _lock_waiting_byte(fd, fcntl.LOCK_EX):
        return True
    _done_waiting(fd)
    return False


class FileBackend(Backend):
    """Per-key leases between processes on one host, one lock file per key.

    Exclusion between processes comes from an OS lock on the key's file (flock, through
    portalocker): the OS frees it when its holder dies, so a crash never leaves a key locked.
    Between tasks, threads and event loops of one process, a shared in-process layer (a
    :class:`MemoryBackend`) queues callers FIFO in front of the OS lock. Tokens are stored in the
    lock file and rewritten only under the lock, as ``max(last + 1, now in µs)``: strictly
    increasing across processes and across new backends on the same directory, even if a lock
    file is pruned and recreated.

    The directory is opened by a walk from ``/`` that refuses a symlink in any component, and
    an existing one must be safe to rely on: owned by this user and writable by nobody else
    (every directory above it owned by root or this user, or sticky like ``/tmp``), else
    :class:`~keylock.BackendUnavailable`. Whoever can write or rename the lock directory can
    unlink a held lock file (two holders of one key) or rewrite tokens.

    * ``mode="private"`` (the default): directory 0o700, files 0o600; one OS user.
    * ``mode="group"``: directory 0o2770 (setgid), files 0o660, exactly, whatever the umask,
      for OS users sharing the directory's group (cron jobs running as different users). The
      directory may then belong to another member; it must belong to one of this user's groups
      and not be writable by others. Every user of the directory needs ``mode="group"``.
    * ``trust_directory=True``: skip the owner and mode checks of an existing directory (you
      vouch for everyone who can write it); symlinks, hard links and odd files stay refused.

    Lock files are opened with ``O_NOFOLLOW`` and never truncated (filelock's CVE-2025-68146
    truncated a symlink's target): a symlink, a hard link or anything but a regular file
    planted at a lock path makes acquire fail with :class:`~keylock.BackendUnavailable`,
    nothing written to it. Files are kept after release (an
    unlink on release lets two processes lock two different inodes, filelock #574); idle ones
    are removed by :meth:`prune`, and every acquire re-checks after locking that its file is
    still the one at the path.

    A TTL is enforced by this process's in-process layer: an expired lease is taken over by the
    next caller in the same process, reports ``lost``, and its release raises LeaseLost; another
    process takes the key when the holder releases it or dies (the OS lock cannot be broken from
    outside). A forked child does not inherit the parent's leases: it holds nothing, cannot
    release the parent's locks (LeaseLost), and its own acquires wait for the parent's.
    """

    nonblocking_step = True  # open/flock(LOCK_NB)/pread/pwrite on a local file: microseconds

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        ttl: float | None = None,
        mode: Mode = "private",
        trust_directory: bool = False,
    ) -> None:
        self.directory = check_directory(directory)
        self.default_ttl = ttl
        self._files = LockDirectory(self.directory, mode=mode, trust_directory=trust_directory)
        info = os.fstat(self._files.fd)
        with _SHARED_MUTEX:
            shared = _SHARED.get((info.st_dev, info.st_ino))
            if shared is None:
                shared = _SHARED[(info.st_dev, info.st_ino)] = _Shared()
        self._shared = shared

    def __repr__(self) -> str:
        return f"FileBackend({self.directory!r})"

    def close_sync(self) -> None:
        self._files.close()

    def __del__(self) -> None:
        try:
            self.close_sync()
        except Exception:  # interpreter shutdown: nothing left to free
            pass

    # ---------------------------------------------------------------------------- the OS lock

    def _try_os_lock(
        self, key: str, owner: bytes, local: Grant, ttl: float | None, *, wait: bool = False
    ) -> Grant | None:
        """Take *key*'s OS lock for the in-process lease *local*, or None if another process
        holds it (or is owed a turn: see _STEP_ASIDE). Never blocks. With *wait* the caller
        will try again: its file stays open, marked as waiting, until _stop_waiting."""
        shared = self._shared
        with shared.mutex:
            held = shared.held.get(key)
            if held is not None:
                # the in-process layer gave us the key after its holder's TTL ran out, but that
                # holder still has the OS lock: it is ours now (its release will find LeaseLost)
                held.local_token = local[0]
                held.owner = owner
                held.token = token = self._next_token(held.fd, key, owner, ttl)
                return Grant(token, local[1])
            fd, marked = shared.waiting.pop(key, (-1, False))
            aside = shared.aside.get(key)
        waiting = fd >= 0
        if not waiting:
            fd = self._files.open_file(key)
        try:
            if aside is not None and self._stepping_aside(key, fd, aside):
                busy = True
            else:
                try:
                    portalocker.lock(fd, _LOCK_NB)
                    busy = False
                except portalocker.AlreadyLocked:
                    busy = True
            if busy:
                if wait:
                    marked = marked or _say_waiting(fd)
                    with shared.mutex:
                        shared.waiting[key] = (fd, marked)
                else:
                    os.close(fd)  # (drops the waiting mark with it)
                return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if waiting:
                _done_waiting(fd)
            # prune() may have unlinked the file between our open and our lock: then we hold a
            # lock nobody else will ever see (filelock #574's split brain); retry on the new one
            if not self._files.is_current(key, fd):
                portalocker.unlock(fd)
                os.close(fd)
                return None
            token = self._next_token(fd, key, owner, ttl)
        except BaseException:
            portalocker.unlock(fd)
            os.close(fd)
            raise
        with shared.mutex:
            shared.held[key] = _Held(fd, token, owner, local[0], os.getpid())
        # the lease lapses when its in-process turn does: report that expiry, never a later one
        # (counting from now, after the OS lock, told the holder it had ~0.1 ms it did not have)
        return Grant(token, local[1])

    def _stepping_aside(self, key: str, fd: int, aside: tuple[int, float]) -> bool:
        """True while this process owes another process a turn at *key* (see _STEP_ASIDE)."""
        token_then, until = aside
        if time.monotonic() < until and read_token(fd) == token_then:  # nobody took a turn yet
            return True
        with self._shared.mutex:
            self._shared.aside.pop(key, None)
        return False

    def _stop_waiting(self, key: str) -> None:
        """The caller gave up on *key*: close its waiting file (which drops the mark)."""
        with self._shared.mutex:
            fd, _ = self._shared.waiting.pop(key, (-1, False))
        if fd >= 0:
            os.close(fd)

    @staticmethod
    def _next_token(fd: int, key: str, owner: bytes, ttl: float | None) -> int:
        """Mint the next token from the lock file's record and write it back. Caller holds the
        OS lock. ``max(last + 1, now in µs)`` keeps tokens rising even over a recreated file."""
        token = max((read_token(fd) or 0) + 1, time.time_ns() // 1000)
        expires = None if ttl is None else time.time() + ttl
        write_record(fd, token, os.getpid(), expires, owner, key)
        return token

    def _drop_os_lock(self, key: str, held: _Held) -> None:
        try:
            if _others_wait(held.fd):  # our next turn waits until one of them had theirs
                with self._shared.mutex:
                    self._shared.aside[key] = (held.token, time.monotonic() + _STEP_ASIDE)
            portalocker.unlock(held.fd)
        finally:
            os.close(held.fd)

    # ------------------------------------------------------------------------------- step

    def _try_acquire(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        local = self._shared.local._try_acquire(key, owner, ttl, None)
        if local is None:
            return None
        try:
            grant = self._try_os_lock(key, owner, local, ttl)
        except BaseException:
            self._shared.local._discard_sync(key, owner, local)
            raise
        if grant is None:
            self._shared.local._discard_sync(key, owner, local)
        return grant

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        return None  # waiters queue in the in-process layer, which withdraws them itself

    # Two phases: the in-process layer (the memory backend's own driver: FIFO, cancellation,
    # timeouts), then the OS lock, polled with a growing pause (0.5 to 2 ms) since another
    # process cannot wake us; meanwhile the file stays open, marked as waiting, so the holder
    # steps aside for us at its release. The twins differ only in how they sleep.

    async def acquire(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._shared.local
        grant = await local.acquire(key, owner, timeout=timeout, ttl=None)
        try:
            pause = _FIRST_POLL
            while True:
                os_grant = self._try_os_lock(key, owner, grant, None, wait=True)
                if os_grant is not None:
                    return self._arm_ttl(key, owner, os_grant, ttl)
                await asyncio.sleep(_next_pause(pause, deadline, key, timeout))
                pause = min(pause * 2, _MAX_POLL)
        except BaseException:
            self._stop_waiting(key)
            local._discard_sync(key, owner, grant)  # pass the in-process turn on
            raise

    def acquire_sync(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._shared.local
        grant = local.acquire_sync(key, owner, timeout=timeout, ttl=None)
        try:
            pause = _FIRST_POLL
            while True:
                os_grant = self._try_os_lock(key, owner, grant, None, wait=True)
                if os_grant is not None:
                    return self._arm_ttl(key, owner, os_grant, ttl)
                time.sleep(_next_pause(pause, deadline, key, timeout))
                pause = min(pause * 2, _MAX_POLL)
        except BaseException:
            self._stop_waiting(key)
            local._discard_sync(key, owner, grant)
            raise

    def _arm_ttl(self, key: str, owner: bytes, grant: Grant, ttl: float | None) -> Grant:
        """Start the TTL once the OS lock is held (waiting for it must not eat the lease)."""
        if ttl is None:
            return grant
        held = self._shared.held[key]
        expires_at = self._shared.local.extend_sync(key, owner, held.local_token, ttl)
        return Grant(grant[0], expires_at)

    # ------------------------------------------------------------------- release, extend

    def _take_held(self, key: str, owner: bytes, token: int, *, pop: bool) -> _Held:
        with self._shared.mutex:
            held = self._shared.held.get(key)
            if held is None or held.token != token or held.owner != owner:
                raise LeaseLost(
                    f"lease {token} on {key!r} is not held here: it was taken over after its "
                    "TTL, already released, or belongs to a parent process (fork); the critical "
                    "section was not protected",
                    key=key,
                )
            if pop:
                del self._shared.held[key]
            return held

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        held = self._take_held(key, owner, token, pop=True)
        try:
            self._drop_os_lock(key, held)
        finally:
            # then the next caller in this process (raises LeaseLost if the TTL had run out)
            self._shared.local.release_sync(key, owner, held.local_token)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        held = self._take_held(key, owner, token, pop=False)
        return self._shared.local.extend_sync(key, owner, held.local_token, ttl)

    def statistics(self, key: str) -> KeyStatistics:
        local = self._shared.local.statistics(key)
        with self._shared.mutex:
            held = self._shared.held.get(key)
        if held is not None:
            return KeyStatistics(key, True, held.token, held.owner, local.waiting)
        if local.held:  # granted in-process, still waiting for another process
            return KeyStatistics(key, False, None, None, local.waiting + 1)
        token, owner, busy = self._probe(key)
        return KeyStatistics(key, busy, token if busy else None, owner, local.waiting)

    def _probe(self, key: str) -> tuple[int | None, bytes | None, bool]:
        """(token, owner, held by another process) from the lock file, without waiting."""
        fd = self._files.open_name(file_name(key))
        if fd is None:  # never locked, or pruned
            return None, None, False
        try:
            record = read_record(fd, with_key=False)
            token, owner = record.token, record.owner
            try:
                portalocker.lock(
                    fd, portalocker.LockFlags.SHARED | portalocker.LockFlags.NON_BLOCKING
                )
            except portalocker.AlreadyLocked:
                return token, owner, True
            portalocker.unlock(fd)
            return token, owner, False
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------- cleanup

    def prune(self, *, idle_for: float = 0.0) -> int:
        """Remove lock files nobody holds (and untouched for *idle_for* seconds); return how many.

        Safe against racing acquirers: a file is unlinked only while locked, and an acquirer
        that locked an unlinked file notices (inode re-check) and retries on the new one.
        """
        removed = 0
        now = time.time()
        for name in self._files.lock_names():
            fd = self._files.open_name(name, writable=True)
            if fd is None:  # gone, or not a plain lock file: not ours to remove
                continue
            try:
                if now - os.fstat(fd).st_mtime < idle_for:
                    continue
                try:
                    portalocker.lock(fd, _LOCK_NB)
                except portalocker.AlreadyLocked:
                    continue
                try:
                    self._files.unlink(name)
                    removed += 1
                finally:
                    portalocker.unlock(fd)
            finally:
                os.close(fd)
        return removed


def _next_pause(pause: float, deadline: float | None, key: str, timeout: float | None) -> float:
    """How long to sleep before the next try of the OS lock; LockTimeout past the deadline."""
    if deadline is None:
        return pause
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(key, timeout)
    return min(pause, remaining)
