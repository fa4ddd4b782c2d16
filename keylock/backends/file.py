"""Leases between processes on one host: one lock file per key, locked with portalocker (flock).

Layout of ``directory`` (created with mode 0o700 if missing): one file per key, named
``<readable>.<hash>.lock``, where *readable* keeps the key's ``[A-Za-z0-9._-]`` characters (at
most 64, others become ``_``, leading dots dropped) and *hash* is 16 hex digits of the key's
SHA-256, so two keys never share a file and no key can name a path outside the directory (no
``/``, no ``..``, no NUL, bounded length). Each file holds one text record, rewritten by each
holder under the lock: ``token pid expires_at owner``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import math
import os
import re
import stat
import threading
import time
import weakref
from typing import TYPE_CHECKING

import portalocker

from .._validate import check_backend_ttl
from ..errors import BackendUnavailable
from ._tiered import Flow, Held, Step, Tier, TieredBackend
from .base import Deadline, Grant, KeyStatistics

if TYPE_CHECKING:
    from collections.abc import Hashable

    from ._waiters import Waiter

__all__ = ["FileBackend"]

_RECORD_SIZE = 128  # bytes of the record at the start of each lock file
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
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@functools.lru_cache(maxsize=4096)
def file_name(key: str) -> str:
    """The lock file's name for *key*: readable where possible, always unique and contained."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:64].lstrip(".") or "key"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}.{digest}.lock"


class _Held(Held):
    """The OS lock this process holds on one key, and the lease it belongs to."""

    __slots__ = ("fd",)

    def __init__(self, fd: int, token: int, owner: bytes, local_token: int) -> None:
        super().__init__(token, owner, local_token)
        self.fd = fd


class _Shared(Tier):
    """Per process and lock directory: the in-process tier shared by every FileBackend on it
    (FIFO hand-off, TTL takeover and exclusion between tasks, threads and event loops of this
    process), so the OS lock only arbitrates between processes."""

    held: dict[str, _Held]  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()  # mutex also guards aside, waiting, fds
        # key -> (token at our release, monotonic time until which we step aside)
        self.aside: dict[str, tuple[int, float]] = {}
        # key -> (open file, marked as waiting yet) of this process's caller waiting for the key
        self.waiting: dict[str, tuple[int, bool]] = {}
        # every lock-file descriptor open in this process, from its open to its close: a fork
        # (which waits for mutex) can then close in the child each one the parent had open,
        # even one between its flock and its entry in held
        self.fds: set[int] = set()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's leases and locks."""
        # A forked child inherits the parent's descriptors: closing them does not release the
        # parent's flock (filelock #634 came from unlocking instead), and the child must not
        # think it holds anything, or keep a parent's lock alive after the parent dies.
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.__init__()  # type: ignore[misc]  # (POSIX locks are not inherited either)


_SHARED: weakref.WeakValueDictionary[tuple[int, int], _Shared] = weakref.WeakValueDictionary()
_SHARED_MUTEX = threading.Lock()
_FORKING: list[_Shared] = []  # the tiers whose mutex a fork in progress holds


def _before_fork() -> None:
    _SHARED_MUTEX.acquire()
    _FORKING[:] = list(_SHARED.values())
    for shared in _FORKING:
        shared.mutex.acquire()


def _after_fork_in_parent() -> None:
    for shared in _FORKING:
        shared.mutex.release()
    _FORKING.clear()
    _SHARED_MUTEX.release()


def _after_fork_in_child() -> None:
    global _SHARED_MUTEX
    _SHARED_MUTEX = threading.Lock()
    for shared in _FORKING:
        shared.reset_after_fork()
    _FORKING.clear()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


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


def _open_directory(directory: str) -> int:
    """Open (creating with mode 0o700) the lock directory; refuse a symlink or a read-only one."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise BackendUnavailable(
                f"lock directory {directory!r} is a symlink or not a directory: "
                "point FileBackend at a real directory (symlinks are refused so nobody can "
                "redirect your lock files)"
            ) from exc
        raise BackendUnavailable(
            f"cannot open lock directory {directory!r}: {exc.strerror}; "
            "create it or pick a directory this user may write"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        os.close(fd)
        raise BackendUnavailable(
            f"lock directory {directory!r} is not writable by this user: "
            "fix its permissions or pick another directory"
        )
    return fd


class FileBackend(TieredBackend):
    """Per-key leases between processes on one host, one lock file per key.

    Exclusion between processes comes from an OS lock on the key's file (flock, through
    portalocker): the OS frees it when its holder dies, so a crash never leaves a key locked.
    Between tasks, threads and event loops of one process, a shared in-process layer (a
    :class:`MemoryBackend`) queues callers FIFO in front of the OS lock. Tokens are stored in the
    lock file and rewritten only under the lock, as ``max(last + 1, now in µs)``: strictly
    increasing across processes and across new backends on the same directory, even if a lock
    file is pruned and recreated.

    Lock files are opened with ``O_NOFOLLOW`` and never truncated (filelock's CVE-2025-68146
    truncated a symlink's target): a symlink planted at a lock path makes acquire fail with
    :class:`~keylock.BackendUnavailable`, target untouched. Files are kept after release (an
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

    def __init__(self, directory: str | os.PathLike[str], *, ttl: float | None = None) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.default_ttl = check_backend_ttl(ttl, "FileBackend")
        self._dir_fd = _open_directory(self.directory)
        info = os.fstat(self._dir_fd)
        with _SHARED_MUTEX:
            shared = _SHARED.get((info.st_dev, info.st_ino))
            if shared is None:
                shared = _SHARED[(info.st_dev, info.st_ino)] = _Shared()
        self._tier = self._shared = shared

    def __repr__(self) -> str:
        return f"FileBackend({self.directory!r})"

    def close_sync(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __del__(self) -> None:
        try:
            self.close_sync()
        except Exception:  # interpreter shutdown: nothing left to free
            pass

    # ---------------------------------------------------------------------------- the OS lock

    def _open(self, key: str) -> int:
        try:
            return os.open(file_name(key), _OPEN_FLAGS, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BackendUnavailable(
                    f"lock file for {key!r} ({file_name(key)} in {self.directory}) is a symlink: "
                    "someone planted it; remove it (its target was not touched)",
                    key=key,
                ) from exc
            raise BackendUnavailable(
                f"cannot open the lock file for {key!r} in {self.directory}: {exc.strerror}",
                key=key,
            ) from exc

    def _open_tracked(self, key: str) -> int:
        """Open *key*'s lock file, registered in ``fds`` until :meth:`_close` (see fork)."""
        shared = self._shared
        with shared.mutex:
            fd = self._open(key)
            shared.fds.add(fd)
        return fd

    def _open_inodes(self) -> set[int]:
        """The inodes of the lock files this process has open (held, waiting or in a try)."""
        shared = self._shared
        with shared.mutex:
            return {os.fstat(fd).st_ino for fd in shared.fds}

    def _close(self, fd: int) -> None:
        shared = self._shared
        with shared.mutex:
            shared.fds.discard(fd)
            os.close(fd)

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
                held.token = token = self._next_token(held.fd, owner, ttl)
                return Grant(token, local[1], local[2])
            fd, marked = shared.waiting.pop(key, (-1, False))
            aside = shared.aside.get(key)
        waiting = fd >= 0
        if not waiting:
            fd = self._open_tracked(key)
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
                    self._close(fd)  # (drops the waiting mark with it)
                return None
        except BaseException:
            self._close(fd)
            raise
        try:
            if waiting:
                _done_waiting(fd)
            # prune() may have unlinked the file between our open and our lock: then we hold a
            # lock nobody else will ever see (filelock #574's split brain); retry on the new one
            here = os.fstat(fd)
            try:
                there = os.stat(file_name(key), dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_ino, there.st_dev) != (here.st_ino, here.st_dev):
                portalocker.unlock(fd)
                self._close(fd)
                return None
            token = self._next_token(fd, owner, ttl)
        except BaseException:
            portalocker.unlock(fd)
            self._close(fd)
            raise
        with shared.mutex:
            shared.held[key] = _Held(fd, token, owner, local[0])
        # the lease lapses when its in-process turn does: report that expiry, never a later one
        return Grant(token, local[1], local[2])

    def _stepping_aside(self, key: str, fd: int, aside: tuple[int, float]) -> bool:
        """True while this process owes another process a turn at *key* (see _STEP_ASIDE)."""
        token_then, until = aside
        if time.monotonic() < until:
            record = os.pread(fd, _RECORD_SIZE, 0).split(b" ", 1)[0]
            if record.isdigit() and int(record) == token_then:  # nobody took a turn yet
                return True
        with self._shared.mutex:
            self._shared.aside.pop(key, None)
        return False

    def _step_aside(self, key: str, token: int) -> None:
        """After our release of *key*, owe its waiting processes a turn (see _STEP_ASIDE)."""
        now = time.monotonic()
        with self._shared.mutex:
            aside = self._shared.aside
            # entries nobody came back for would pile up, one per key ever released
            for stale in [k for k, (_, until) in aside.items() if until <= now]:
                del aside[stale]
            aside[key] = (token, now + _STEP_ASIDE)

    def _stop_waiting(self, key: str) -> None:
        """The caller gave up on *key*: close its waiting file (which drops the mark)."""
        with self._shared.mutex:
            fd, _ = self._shared.waiting.pop(key, (-1, False))
        if fd >= 0:
            self._close(fd)

    @staticmethod
    def _next_token(fd: int, owner: bytes, ttl: float | None) -> int:
        """Mint the next token from the lock file's record and write it back. Caller holds the
        OS lock. ``max(last + 1, now in µs)`` keeps tokens rising even over a recreated file."""
        record = os.pread(fd, _RECORD_SIZE, 0).split(b" ", 1)[0]
        last = int(record) if record.isdigit() else 0
        token = max(last + 1, time.time_ns() // 1000)
        expires = "-" if ttl is None else f"{time.time() + ttl:.6f}"
        line = f"{token} {os.getpid()} {expires} {owner.hex()}\n".encode()
        os.pwrite(fd, line.ljust(_RECORD_SIZE), 0)
        return token

    def _drop_os_lock(self, key: str, held: _Held) -> None:
        try:
            if _others_wait(held.fd):  # our next turn waits until one of them had theirs
                self._step_aside(key, held.token)
            portalocker.unlock(held.fd)
        finally:
            self._close(held.fd)

    # --------------------------------------------------------------- the arbiter's part

    def _try_now(self, key: str, owner: bytes, ttl: float | None, local: Grant) -> Grant | None:
        return self._try_os_lock(key, owner, local, ttl)

    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        return _FileFlow(key, owner, ttl, deadline, waiter, local)

    def _local_ttl(self, ttl: float | None) -> float | None:
        return None  # waiting for another process must not eat the lease: see _adopt

    def _trip_sync(self, flow: Flow, trip: Hashable) -> object:
        if trip == _LEAVE:
            self._stop_waiting(flow.key)
            return None
        return self._try_os_lock(flow.key, flow.owner, flow.local, None, wait=True)

    def _adopt(self, flow: Flow) -> Grant:
        """The OS lock is ours (recorded by _try_os_lock): start the TTL only now."""
        grant = flow.grant
        assert grant is not None
        if flow.ttl is None:
            return grant
        held = self._shared.held[flow.key]
        return self._extend_local(flow.key, held, flow.ttl)

    def _end_sync(self, key: str, held: Held) -> bool:
        assert isinstance(held, _Held)
        self._drop_os_lock(key, held)
        return True

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        return self._extend_local(key, held, ttl)

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        if local.held:  # granted in-process, still waiting for another process
            return KeyStatistics(key, False, None, None, local.waiting + 1)
        token, owner, busy = self._probe(key)
        return KeyStatistics(key, busy, token if busy else None, owner, local.waiting)

    def _probe(self, key: str) -> tuple[int | None, bytes | None, bool]:
        """(token, owner, held by another process) from the lock file, without waiting."""
        try:
            fd = os.open(
                file_name(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd
            )
        except OSError:  # no file (never locked, or pruned), or not a regular file
            return None, None, False
        try:
            fields = os.pread(fd, _RECORD_SIZE, 0).split()
            token = int(fields[0]) if fields and fields[0].isdigit() else None
            owner = bytes.fromhex(fields[3].decode()) if len(fields) > 3 else None
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
        # Files this process has open are skipped unopened: closing any descriptor of a file
        # drops every POSIX lock this process has on it, a waiting caller's mark included.
        ours = self._open_inodes()
        for entry in os.scandir(self._dir_fd):
            if not entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
                continue
            if entry.inode() in ours:
                continue
            try:
                fd = os.open(
                    entry.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd
                )
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < idle_for:
                    continue
                try:
                    portalocker.lock(fd, _LOCK_NB)
                except portalocker.AlreadyLocked:
                    continue
                try:
                    os.unlink(entry.name, dir_fd=self._dir_fd)
                    removed += 1
                finally:
                    portalocker.unlock(fd)
            finally:
                os.close(fd)
        return removed


_LEAVE = "leave"
_TRY = "try"


class _FileFlow(Flow):
    """Polls the OS lock (another process cannot wake us) with a growing pause, 0.5 to 2 ms;
    meanwhile the file stays open, marked as waiting, so the holder steps aside for us."""

    _pause = 0.0  # the last pause between two tries
    _due = -math.inf  # time.monotonic() of the next try; the last one falls on the deadline

    def next(self, now: float) -> Step | None:
        if self.grant is not None:
            return None
        if now >= self._due:
            return Step(_TRY, None)
        return Step(None, self._due - now)

    def on_reply(self, reply: object, now: float) -> None:
        if reply is not None:
            assert isinstance(reply, Grant)
            self.grant = reply
            return
        if self.deadline.passed(now):
            raise self.deadline.expired()
        self._pause = min(self._pause * 2, _MAX_POLL) if self._pause else _FIRST_POLL
        self._due = min(now + self._pause, self.deadline.at)

    def leaving(self) -> Hashable | None:
        return _LEAVE
