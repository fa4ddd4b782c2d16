"""Leases between processes on one host: one lock file per key, locked with portalocker (flock).

Layout of ``directory`` (created with mode 0o700 if missing): one file per key, named
``<readable>.<hash>.lock``, where *readable* keeps the key's ``[A-Za-z0-9._-]`` characters (at
most 64, others become ``_``, leading dots dropped) and *hash* is 16 hex digits of the key's
SHA-256, so two keys never share a file and no key can name a path outside the directory (no
``/``, no ``..``, no NUL, bounded length). Each file holds one text record, rewritten by each
holder under the lock: ``token pid expires_at owner``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import re
import stat
import threading
import time
import weakref
from dataclasses import dataclass

import portalocker

from ..errors import BackendUnavailable, LeaseLost
from .base import Backend, Grant, KeyStatistics, Waiter, _timeout
from .memory import MemoryBackend

__all__ = ["FileBackend"]

_RECORD_SIZE = 128  # bytes of the record at the start of each lock file
_FIRST_POLL = 0.0005  # seconds before the first retry of a busy OS lock; doubles each time
_MAX_POLL = 0.02  # the longest wait between retries (another process holds the key)
_LOCK_NB = portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@functools.lru_cache(maxsize=4096)
def file_name(key: str) -> str:
    """The lock file's name for *key*: readable where possible, always unique and contained."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:64].lstrip(".") or "key"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}.{digest}.lock"


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
        self.mutex = threading.Lock()  # guards held
        self.held: dict[str, _Held] = {}  # key -> OS lock held by this process

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's leases and locks."""
        # A forked child inherits the parent's descriptors: closing them does not release the
        # parent's flock (filelock #634 came from unlocking instead), and the child must not
        # think it holds anything.
        for held in self.held.values():
            try:
                os.close(held.fd)
            except OSError:
                pass
        self.local = MemoryBackend()
        self.mutex = threading.Lock()
        self.held = {}


_SHARED: weakref.WeakValueDictionary[tuple[int, int], _Shared] = weakref.WeakValueDictionary()
_SHARED_MUTEX = threading.Lock()


def _after_fork_in_child() -> None:
    global _SHARED_MUTEX
    _SHARED_MUTEX = threading.Lock()
    for shared in list(_SHARED.values()):
        shared.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


class FileBackend(Backend):
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
        self.default_ttl = ttl
        self._dir_fd = _open_directory(self.directory)
        info = os.fstat(self._dir_fd)
        with _SHARED_MUTEX:
            shared = _SHARED.get((info.st_dev, info.st_ino))
            if shared is None:
                shared = _SHARED[(info.st_dev, info.st_ino)] = _Shared()
        self._shared = shared

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

    def _try_os_lock(self, key: str, owner: bytes, local: Grant, ttl: float | None) -> Grant | None:
        """Take *key*'s OS lock for the in-process lease *local*, or None if another process
        holds it. Never blocks."""
        shared = self._shared
        with shared.mutex:
            held = shared.held.get(key)
            if held is not None:
                # the in-process layer gave us the key after its holder's TTL ran out, but that
                # holder still has the OS lock: it is ours now (its release will find LeaseLost)
                held.local_token = local[0]
                held.owner = owner
                held.token = token = self._next_token(held.fd, owner, ttl)
                return Grant(token, local[1])
        fd = self._open(key)
        try:
            portalocker.lock(fd, _LOCK_NB)
        except portalocker.AlreadyLocked:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            # prune() may have unlinked the file between our open and our lock: then we hold a
            # lock nobody else will ever see (filelock #574's split brain); retry on the new one
            here = os.fstat(fd)
            try:
                there = os.stat(file_name(key), dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_ino, there.st_dev) != (here.st_ino, here.st_dev):
                portalocker.unlock(fd)
                os.close(fd)
                return None
            token = self._next_token(fd, owner, ttl)
        except BaseException:
            portalocker.unlock(fd)
            os.close(fd)
            raise
        with shared.mutex:
            shared.held[key] = _Held(fd, token, owner, local[0], os.getpid())
        # the in-process lease's expiry, not a new reading of the clock: the in-process layer
        # hands the key on at its own deadline, and an expiry read after the file I/O above
        # would let this holder believe in its lease after that (a phantom grant)
        return Grant(token, local[1])

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

    def _drop_os_lock(self, held: _Held) -> None:
        try:
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
    # timeouts), then the OS lock, polled with a growing pause since another process cannot
    # wake us. The twins differ only in how they sleep.

    async def acquire(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._shared.local
        grant = await local.acquire(key, owner, timeout=timeout, ttl=None)
        try:
            pause = _FIRST_POLL
            while True:
                os_grant = self._try_os_lock(key, owner, grant, None)
                if os_grant is not None:
                    return self._arm_ttl(key, owner, os_grant, ttl)
                await asyncio.sleep(_next_pause(pause, deadline, key, timeout))
                pause = min(pause * 2, _MAX_POLL)
        except BaseException:
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
                os_grant = self._try_os_lock(key, owner, grant, None)
                if os_grant is not None:
                    return self._arm_ttl(key, owner, os_grant, ttl)
                time.sleep(_next_pause(pause, deadline, key, timeout))
                pause = min(pause * 2, _MAX_POLL)
        except BaseException:
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
            self._drop_os_lock(held)
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
        for entry in os.scandir(self._dir_fd):
            if not entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
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


def _next_pause(pause: float, deadline: float | None, key: str, timeout: float | None) -> float:
    """How long to sleep before the next try of the OS lock; LockTimeout past the deadline."""
    if deadline is None:
        return pause
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(key, timeout)
    return min(pause, remaining)
