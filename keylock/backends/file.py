"""Leases between processes on one host: one lock file per key, locked with flock.

Layout of ``directory`` (created with mode 0o700 if missing, 0o2770 with ``mode="group"``): one
file per key, named ``<readable>.<hash>.lock``, where *readable* keeps the key's
``[A-Za-z0-9._-]`` characters (at most 64, others become ``_``, leading dots dropped) and *hash*
is 32 hex digits (128 bits) of the key's SHA-256, so two keys never share a file and no key can
name a path outside the directory (no ``/``, no ``..``, no NUL, bounded length). Each file holds
one record, rewritten by each holder under the lock: ``token pid expires_at owner``, a mark
saying whether that lease was released, then the key. Paths and modes live in
:mod:`keylock.backends._filepaths`, the record in :mod:`keylock.backends._filerecord`.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

from .._validate import check_backend_ttl
from ..errors import BackendUnavailable, LeaseLost
from ._filepaths import LockDirectory, Mode, check_directory, file_name
from ._filerecord import mark_released, read_last, write_record
from ._filescan import probe, prune
from ._fileshared import (
    PID,
    SHARED,
    SHARED_MUTEX,
    STEP_ASIDE,
    FileHeld,
    Shared,
    Waiting,
    close_tracked,
    done_waiting,
    others_wait,
    say_waiting,
    try_flock,
    unlock,
)
from ._filewait import BLOCKED, LEAVE, TRY, UNMARKED, FileFlow, leave, take_turn
from ._filewait import block as block_in_flock
from ._tiered import Flow, Held, TieredBackend
from .base import Deadline, Grant, KeyStatistics

if TYPE_CHECKING:
    from ._waiters import Waiter

__all__ = ["FileBackend", "file_name"]

_RELEASING = 60.0  # seconds a releasing turn is kept live for its release to finish


class FileBackend(TieredBackend):
    """Per-key leases between processes on one host, one lock file per key.

    Exclusion between processes comes from an OS lock on the key's file (flock): the OS frees
    it when its holder dies, so a crash never leaves a key locked. A waiter sleeps in flock, so
    the kernel wakes it at the holder's unlock (:mod:`~keylock.backends._filewait`); a releaser
    steps aside for waiting processes (:mod:`~keylock.backends._fileshared`).
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

    ``lease.took_over`` is read from the lock file's record: a clean release of a live lease
    marks it released before the OS lock is dropped, so a new holder that finds it unmarked
    follows a holder that died (SIGKILL included) or whose TTL ran out. :meth:`prune` forgets
    that: the next holder of a pruned key is told nothing was taken over.
    """

    nonblocking_step = True  # open/flock(LOCK_NB)/pread/pwrite on a local file: microseconds
    # semaphores and RW locks: each permit an OS lock on a slot file (limits up to 64)
    permit_module = "keylock.backends._filepermitview"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        ttl: float | None = None,
        mode: Mode = "private",
        trust_directory: bool = False,
    ) -> None:
        self.directory = check_directory(directory)
        self.default_ttl = check_backend_ttl(ttl, "FileBackend")
        self._files = LockDirectory(self.directory, mode=mode, trust_directory=trust_directory)
        info = os.fstat(self._files.fd)
        with SHARED_MUTEX:
            shared = SHARED.get((info.st_dev, info.st_ino))
            if shared is None:
                shared = SHARED[(info.st_dev, info.st_ino)] = Shared()
        self._tier = shared

    @property
    def _shared(self) -> Shared:
        """This process's tier for the directory (one per directory, shared by backends)."""
        return self._tier  # type: ignore[return-value]

    @_shared.setter
    def _shared(self, shared: Shared) -> None:
        self._tier = shared

    def __repr__(self) -> str:
        return f"FileBackend({self.directory!r})"

    # a held lease is its lock file's own descriptor: its release and extend need nothing
    # close() ends, and refusing the release would keep the key until this process exits
    _leases_outlive_close = True

    def close_sync(self) -> None:
        self._shut = True
        self._shared.close_idle()  # (another backend on the directory opens them again)
        self._files.close()

    def __del__(self) -> None:
        # Collected unclosed: no ResourceWarning (unlike Redis and Postgres backends), since
        # this frees all it owns, one directory descriptor, without loss or threads left behind
        # (the idle files are the tier's, and its mutex may be held here: no close_sync)
        try:
            self._files.close()
        except Exception:  # half-built, or interpreter shutdown: nothing left to free
            pass

    # ---------------------------------------------------------------------------- the OS lock

    def _open_tracked(self, key: str) -> int:
        """*key*'s lock file: its idle open one, or a new one; registered in ``fds`` until
        close_tracked or keep_idle (see fork)."""
        shared = self._shared
        with shared.mutex:
            fd = shared.take_idle(key)
            if fd is None:
                fd, shared.ids[fd] = self._files.open_key(key)
                shared.fds.add(fd)
        return fd

    def _open_inodes(self) -> set[int]:
        """The inodes of the lock files in use here (held, waiting or in a try): idle ones are
        closed first, so prune can take them."""
        shared = self._shared
        shared.close_idle()
        with shared.mutex:
            return {os.fstat(fd).st_ino for fd in shared.fds}

    def _try_os_lock(self, key: str, owner: bytes, local: Grant, ttl: float | None) -> Grant | None:
        """Take *key*'s OS lock for the in-process lease *local*, or None if another process
        holds it (or is owed a turn: see STEP_ASIDE). Never blocks."""
        taken = self._take_over(key, owner, local, ttl)
        if taken is not None:
            return taken
        # (never a waiting file: one whose caller gave up may still be in a thread's flock)
        fd = self._open_tracked(key)
        try:
            free = not self._shared.stepping_aside(key, fd) and try_flock(fd)
        except BaseException:
            close_tracked(self._shared, fd)
            raise
        if not free:
            self._shared.keep_idle(key, fd)
            return None
        return self._locked(key, fd, owner, local, ttl, waited=False)

    def _wait_os_lock(self, flow: Flow, *, block: bool, inline: bool) -> object:
        """The trip of *flow*'s caller, waiting for its key's OS lock: its Grant, None (busy:
        poll), or BLOCKED/UNMARKED once a pool thread waits in flock for it (with *block*,
        unless the pool is full). With *inline* too, a caller without a deadline waits in flock
        itself. Its file stays open, marked as waiting, until the grant or its leaving."""
        key, owner, local, shared = flow.key, flow.owner, flow.local, self._shared
        taken = self._take_over(key, owner, local, None)
        if taken is not None:
            return taken
        with shared.mutex:
            wait = shared.waiting.get(key)
            if wait is not None and wait.blocked:
                if not wait.done:  # still in flock: wake this caller (maybe a new one)
                    wait.waiter = flow.waiter
                    if not wait.marked:
                        wait.marked = say_waiting(wait.fd)
                    return BLOCKED if wait.marked else UNMARKED
                del shared.waiting[key]  # the flock returned, for this caller
        if wait is not None and wait.done:
            if wait.error is not None:
                close_tracked(self._shared, wait.fd)
                raise BackendUnavailable(
                    f"waiting for the lock file of {key!r} failed ({wait.error}); "
                    "retry, or check the lock directory's file system",
                    key=key,
                ) from wait.error
            return self._locked(key, wait.fd, owner, local, None, waited=True)
        if wait is None:
            wait = Waiting(self._open_tracked(key))
            with shared.mutex:  # from here on its leaving closes it
                shared.waiting[key] = wait
        fd = wait.fd
        aside = self._shared.stepping_aside(key, fd)
        if not aside and try_flock(fd):
            with shared.mutex:
                del shared.waiting[key]
            return self._locked(key, fd, owner, local, None, waited=True)
        if not wait.marked:
            wait.marked = say_waiting(fd)
        turn = (lambda: self._shared.stepping_aside(key, fd)) if aside else None
        if block and inline and wait.marked and flow.deadline.at == math.inf:
            # a sync caller without a timeout can only give up on a signal in the main thread,
            # which interrupts flock as it would interrupt any wait: it blocks in flock itself
            # (once marked: unmarked, it goes through the pool, which looks again soon)
            take_turn(fd, turn, lambda: True)
            with shared.mutex:
                del shared.waiting[key]
            return self._locked(key, fd, owner, local, None, waited=True)
        if block:
            with shared.mutex:
                wait.blocked, wait.waiter = True, flow.waiter
            if block_in_flock(shared, key, wait, turn):
                return BLOCKED if wait.marked else UNMARKED
            with shared.mutex:  # (the pool never saw it)
                wait.blocked, wait.waiter = False, None
        return None

    def _take_over(self, key: str, owner: bytes, local: Grant, ttl: float | None) -> Grant | None:
        """*local*'s grant if this process still holds the key's OS lock for a lease whose TTL
        ran out here (its release will find LeaseLost); None if it does not hold the key."""
        shared = self._shared
        with shared.mutex:
            held = shared.held.get(key)
            if held is None:
                return None
            held.local_token = local[0]
            held.owner = owner
            held.timed = local[2] is not None
            held.token, _ = self._next_token(held.fd, key, owner, ttl)
            # took over: the turn before ours lapsed (its holder still had the OS lock)
            return Grant(held.token, local[1], local[2], True)

    def _locked(
        self, key: str, fd: int, owner: bytes, local: Grant, ttl: float | None, *, waited: bool
    ) -> Grant | None:
        """*fd* just took *key*'s OS lock: record the lease (None if the file was pruned)."""
        try:
            if waited:
                done_waiting(fd)
            # prune() may have unlinked the file between our open and our lock: then we hold a
            # lock nobody else will ever see (filelock #574's split brain); retry on the new one
            if not self._files.is_current(key, self._shared.ids[fd]):
                unlock(fd)
                close_tracked(self._shared, fd)
                return None
            token, took_over = self._next_token(fd, key, owner, ttl)
        except BaseException:
            unlock(fd)
            close_tracked(self._shared, fd)
            raise
        shared = self._shared
        with shared.mutex:
            shared.held[key] = FileHeld(fd, token, owner, local[0], timed=local[2] is not None)
        # the lease lapses when its in-process turn does: report that expiry, never a later one;
        # it took the key over if the last holder (here or in another process) never released
        return Grant(token, local[1], local[2], took_over or local[3])

    def _step_aside(self, key: str, token: int) -> None:
        """After our release of *key*, owe its waiting processes a turn (see STEP_ASIDE)."""
        now = time.monotonic()
        with self._shared.mutex:
            aside = self._shared.aside
            # entries nobody came back for would pile up, one per key ever released
            for stale in [k for k, (_, until) in aside.items() if until <= now]:
                del aside[stale]
            aside[key] = (token, now + STEP_ASIDE)

    @staticmethod
    def _next_token(fd: int, key: str, owner: bytes, ttl: float | None) -> tuple[int, bool]:
        """Mint the next token from the lock file's record and write the new holder's record;
        return it and whether the last lease there ended without a release (took over). Caller
        holds the OS lock. ``max(last + 1, now in µs)`` keeps tokens rising even over a
        recreated file."""
        last, took_over = read_last(fd)
        token = max((last or 0) + 1, time.time_ns() // 1000)
        expires = None if ttl is None else time.time() + ttl
        write_record(fd, token, PID[0], expires, owner, key)
        return token, took_over

    def _drop_os_lock(self, key: str, held: FileHeld, *, released: bool) -> None:
        """Give the OS lock up; *released*: the lease ended by its holder's release while
        live, which the record says before any other process can read it."""
        try:
            if released:
                mark_released(held.fd)
            if others_wait(held.fd):  # our next turn waits until one of them had theirs
                self._step_aside(key, held.token)
            unlock(held.fd)
        except BaseException:
            close_tracked(self._shared, held.fd)
            raise
        self._shared.keep_idle(key, held.fd)

    def _live_until_released(self, key: str, held: FileHeld) -> bool:
        """True if *held*'s in-process turn is still live, and then kept live until the
        release that follows (a lapse in between would let the record say released while its
        holder hears LeaseLost); False if its TTL ran out."""
        if not held.timed:
            return True
        try:
            self._shared.local.extend_sync(key, held.owner, held.local_token, _RELEASING)
        except LeaseLost:
            return False
        return True

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
        return FileFlow(key, owner, ttl, deadline, waiter, local)

    def _local_ttl(self, ttl: float | None) -> float | None:
        return None  # waiting for another process must not eat the lease: see _adopt

    def _trip_sync(self, flow: Flow, trip: object) -> object:
        return self._make_trip(flow, trip, inline=True)

    async def _trip(self, flow: Flow, trip: object) -> object:
        return self._make_trip(flow, trip, inline=False)  # (an event loop never blocks)

    def _make_trip(self, flow: Flow, trip: object, *, inline: bool) -> object:
        if trip == LEAVE:
            leave(self._shared, flow.key)
            return None
        return self._wait_os_lock(flow, block=trip == TRY, inline=inline)

    def _adopt(self, flow: Flow) -> Grant:
        """The OS lock is ours (recorded by _try_os_lock): start the TTL only now."""
        grant = flow.grant
        assert grant is not None
        if flow.ttl is None:
            return grant
        held = self._shared.held[flow.key]
        held.timed = True
        dated = self._extend_local(flow.key, held, flow.ttl)
        return Grant(dated[0], dated[1], dated[2], grant[3])

    def _end_sync(self, key: str, held: Held) -> bool:
        assert isinstance(held, FileHeld)
        self._drop_os_lock(key, held, released=self._live_until_released(key, held))
        return True

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        assert isinstance(held, FileHeld)
        grant = self._extend_local(key, held, ttl)
        held.timed = True
        return grant

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        if local.held:  # granted in-process, still waiting for another process
            return KeyStatistics(key, False, None, None, local.waiting + 1)
        token, owner, busy = probe(self._files, key)  # (from the lock file, never waits)
        return KeyStatistics(key, busy, token if busy else None, owner, local.waiting)

    # ---------------------------------------------------------------------------- cleanup

    def prune(self, *, idle_for: float = 0.0) -> int:
        """Remove lock files nobody holds (and untouched for *idle_for* seconds); return how many.

        Safe against racing acquirers: a file is unlinked only while locked, and an acquirer
        that locked an unlinked file notices (inode re-check) and retries on the new one.
        """
        # Files this process has open are skipped unopened: closing any descriptor of a file
        # drops every POSIX lock this process has on it, a waiting caller's mark included.
        return prune(self._files, self._open_inodes(), idle_for)
