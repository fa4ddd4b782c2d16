"""Permits between processes on one host (FileBackend semaphores and RW locks): a dead
holder's permit is freed by the OS, waiters sleep in flock, tokens rise across all permits.

Files of a permit key, next to the lock files (``<readable>.<hash>`` as for a lock, so the
same path rules and refusals apply; other suffixes: the permit keyspace is not the lock's):

* ``.slot<i>`` (i < limit), for a semaphore: each held permit of weight w holds LOCK_EX on w
  slot files. An RW lock (limit ``RW_LIMIT``) has one file, ``.rw``: a reader holds LOCK_SH,
  a writer LOCK_EX. The OS drops a dead holder's flocks: its permit is free at once.
* ``.gate``: the head of the line. A claim takes it (LOCK_EX), then the capacity it needs,
  then mints its token and lets the gate go; a claim that does not fit waits *holding* the
  gate, so every later claim, of any weight, queues behind it (a waiting writer blocks the
  readers that come after it). The gate file holds the key's token record: ``token seq pid
  owner``, rewritten only by the gate's holder, token = ``max(last + 1, now in µs)``, so
  tokens strictly increase across permits, weights and processes and are never reused.
* ``.limit`` and ``.join``: the limit in use. Every holder and waiter holds LOCK_SH on
  ``.join`` (the OS drops it with the process); a claim joins under LOCK_EX of ``.limit``: if
  nobody holds ``.join`` it writes its limit there, else it must match the one written
  (LimitMismatch otherwise, nothing granted). The record goes with the last holder or waiter.
* ``.wait``: processes waiting at the gate hold a POSIX read lock on its byte 1 (the lock
  path's waiting mark); a process releasing a permit while others are marked steps aside at
  the gate until two grants went by (the one at the gate, then one of the woken waiters),
  nobody is marked any more, or STEP_ASIDE passes, so a releaser cannot take the gate
  straight back every time. Between processes the line is as fair as the lock path's: the
  kernel picks which waiter of the gate it wakes first, not arrival order.

``took_over``: an exclusive slot (and ``.rw`` under a writer) records ``H`` while held and
``R`` once released; a grant that finds ``H`` followed a holder that died or lapsed. (Readers
share ``.rw`` and record nothing: a grant after a dead reader is not told.)

Waiting: in a pool thread's flock (:mod:`~keylock.backends._filepermitwait`), on the gate,
then on every slot the claim lacks (the first to come is taken, the others let go); a sync
caller without a deadline waits for the gate in flock itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import TYPE_CHECKING, TypeAlias

from ..errors import BackendUnavailable
from ._filepaths import file_name
from ._filepermitwait import (
    RECORD,
    Blocked,
    block,
    drop,
    mark,
    note_release,
    read_gate,
    stepping_aside,
    unmark,
)
from ._fileshared import close_tracked, try_flock, unlock
from ._filewait import BLOCKED, take_turn
from .base import RW_LIMIT

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._filepaths import LockDirectory
    from ._fileshared import Shared

__all__ = [
    "BLOCKED",
    "MAX_SLOTS",
    "Claim",
    "Granted",
    "Permit",
    "check_file_shape",
]

MAX_SLOTS = 64  # a waiting claim blocks a pool thread per slot it lacks
_MARK = b"H"  # a slot's record: granted; _FREED: its holder released it
_FREED = b"R"
_JOIN_TRIES = 64  # yields for a joining claim before a step says busy


def check_file_shape(limit: int, weight: int) -> None:
    """ValueError for a permit shape (already checked to be one) the FileBackend cannot keep."""
    if limit == RW_LIMIT:
        if weight not in (1, RW_LIMIT):
            raise ValueError(
                f"FileBackend.permits(): an RW lock's weight is 1 (read) or RW_LIMIT (write), "
                f"not {weight}"
            )
    elif limit > MAX_SLOTS:
        raise ValueError(
            f"FileBackend.permits(): limit {limit} is over {MAX_SLOTS} (a semaphore keeps one "
            f"slot file per permit): use a limit up to {MAX_SLOTS}, or RedisBackend"
        )


Granted: TypeAlias = "tuple[int, bool, Permit]"  # a claim's grant: token, took_over, permit


def _base(key: str) -> str:
    return file_name(key)[: -len(".lock")]


class Permit:
    """A permit this process holds between processes: the slot (or ``.rw``) files it locks
    and its ``.join`` presence; released by :meth:`Claim.release`."""

    __slots__ = ("fds", "presence", "token", "writes")

    def __init__(self, token: int, fds: list[int], presence: int, writes: bool) -> None:
        self.token = token
        self.fds = fds
        self.presence = presence
        self.writes = writes  # its files carry a record (LOCK_EX): mark it released


class Claim:
    """One caller's way to a permit of ``(limit, weight)`` on *key*: join, gate, capacity.
    :meth:`step` never blocks: it returns ``(token, took_over, Permit)``, None (busy: try
    again, or fail a try), or BLOCKED (a pool thread waits; *wake* is called when it ends)."""

    def __init__(
        self,
        files: LockDirectory,
        shared: Shared,
        key: str,
        limit: int,
        weight: int,
        owner: bytes,
        wake: Callable[[], bool],
        mismatch: Callable[[str, int, int], Exception],
    ) -> None:
        check_file_shape(limit, weight)
        self.files, self.shared, self.key, self.owner = files, shared, key, owner
        self.limit, self.wake, self.mismatch = limit, wake, mismatch
        base = _base(key)
        self.base = base
        if limit == RW_LIMIT:
            self.slots = [base + ".rw"]
            self.how = fcntl.LOCK_EX if weight == RW_LIMIT else fcntl.LOCK_SH
            self.need = 1
        else:
            self.slots = [f"{base}.slot{i}" for i in range(limit)]
            self.how, self.need = fcntl.LOCK_EX, weight
        self.presence: int | None = None
        self.gate: int | None = None  # our open gate file; gate_held once we lock it
        self.gate_held = False
        self.gate_wait: Blocked | None = None
        self.held: dict[int, int] = {}  # slot index -> our locked fd
        self.waits: dict[int, Blocked] = {}  # slot index -> a thread's flock for it
        self.marked = False
        self.granted: Permit | None = None  # granted, not yet taken by its caller

    def _open(self, suffix_name: str) -> int:
        with self.shared.mutex:  # tracked, so a fork's child closes it (see Shared.fds)
            fd = self.files.open_file(self.key, suffix_name)
            self.shared.fds.add(fd)
        return fd

    # ---------------------------------------------------------------------------- joining

    def _join(self) -> bool:
        """Hold LOCK_SH on ``.join`` with our limit recorded; False if other claims kept
        joining (each takes microseconds: try again). LimitMismatch on another limit."""
        lfd = self._open(self.base + ".limit")
        try:
            for _ in range(_JOIN_TRIES):
                if try_flock(lfd):
                    break
                os.sched_yield()
            else:
                return False
            try:
                pfd = self._open(self.base + ".join")
                try:
                    if try_flock(pfd):  # nobody holds or waits: our limit is the key's
                        os.pwrite(lfd, f"{self.limit}\n".encode().ljust(24), 0)
                        unlock(pfd)  # (not atomic to SH: harmless, others join under .limit)
                    else:
                        text = os.pread(lfd, 24, 0).split()
                        recorded = int(text[0]) if text and text[0].isdigit() else None
                        if recorded != self.limit:
                            raise self.mismatch(self.key, recorded or 0, self.limit)
                    if not try_flock(pfd, fcntl.LOCK_SH):  # only SH is held: cannot fail
                        raise BackendUnavailable(f"cannot join the permits of {self.key!r}")
                except BaseException:
                    close_tracked(self.shared, pfd)
                    raise
                self.presence = pfd
                return True
            finally:
                unlock(lfd)
        finally:
            close_tracked(self.shared, lfd)

    # ------------------------------------------------------------------------------ steps

    def step(self, *, block_: bool, try_only: bool = False, inline: bool = False) -> object:
        """*inline*: a caller that can only give up on a signal (sync, no deadline) waits for
        the gate in flock itself, as on the lock path (no thread hop per turn)."""
        if self.presence is None and not self._join():
            return None
        if not self.gate_held:
            got = self._take_gate(block_, try_only, inline)
            if got is not True:
                return got
        return self._take_capacity(block_, try_only)

    def _take_gate(self, block_: bool, try_only: bool, inline: bool) -> object:
        shared = self.shared
        wait = self.gate_wait
        if wait is not None:
            with shared.mutex:
                done = wait.done
            if not done:
                return BLOCKED
            self.gate_wait = None
            if wait.error is not None:
                close_tracked(shared, wait.fd)
                raise self._failed(wait.error)
            self.gate, self.gate_held = wait.fd, True
            self.marked = self.marked and unmark(self.shared, self.key)
            return True
        if self.gate is None:
            self.gate = self._open(self.base + ".gate")
        gate = self.gate
        aside = stepping_aside(self.shared, self.files, self.key, self.base, gate)
        if not aside and try_flock(gate):
            self.gate_held = True
            self.marked = self.marked and unmark(self.shared, self.key)
            return True
        if try_only:
            return None
        if not aside:  # (see stepping_aside)
            self.marked = self.marked or mark(self.shared, self.files, self.key, self.base)
        if not block_:
            return None
        turn = (
            (lambda: stepping_aside(self.shared, self.files, self.key, self.base, gate))
            if aside
            else None
        )
        if inline:
            take_turn(gate, turn, lambda: True)
            self.gate_held = True
            self.marked = self.marked and unmark(self.shared, self.key)
            return True
        blocked = Blocked(self.gate, fcntl.LOCK_EX)
        self.gate_wait, self.gate = blocked, None  # only the thread touches that fd now
        if block(shared, blocked, self.wake, turn):
            return BLOCKED
        self.gate_wait, self.gate = None, blocked.fd  # (the pool is full: poll)
        return None

    def _take_capacity(self, block_: bool, try_only: bool) -> object:
        shared = self.shared
        for index, wait in list(self.waits.items()):
            with shared.mutex:
                done = wait.done
            if not done:
                continue
            del self.waits[index]
            if wait.error is not None:
                close_tracked(shared, wait.fd)
                raise self._failed(wait.error)
            if len(self.held) < self.need:
                self.held[index] = wait.fd
            else:
                self._let_go(wait.fd)
        for index, name in enumerate(self.slots):
            if len(self.held) >= self.need:
                break
            if index in self.held or index in self.waits:
                continue
            fd = self._open(name)
            if try_flock(fd, self.how):
                self.held[index] = fd
            else:
                close_tracked(shared, fd)
        if len(self.held) >= self.need:
            return self._grant()
        if try_only:
            self.leave()
            return None
        if not block_:
            return None
        for index, name in enumerate(self.slots):
            if index in self.held or index in self.waits:
                continue
            blocked = Blocked(self._open(name), self.how)
            if not block(shared, blocked, self.wake):
                close_tracked(shared, blocked.fd)
                return None if not self.waits else BLOCKED
            self.waits[index] = blocked
        return BLOCKED

    def _grant(self) -> Granted:
        """We hold the gate and our capacity: mint the token, record it, let the gate go."""
        assert self.gate is not None
        assert self.presence is not None
        for wait in self.waits.values():
            drop(self.shared, wait)
        self.waits.clear()
        last, seq = read_gate(self.gate)
        token = max(last + 1, time.time_ns() // 1000)
        line = f"{token} {seq + 1} {os.getpid()} {self.owner.hex()}\n".encode().ljust(RECORD)
        os.pwrite(self.gate, line, 0)
        took_over = False
        writes = self.how == fcntl.LOCK_EX
        for fd in self.held.values():
            took_over = took_over or os.pread(fd, 1, RECORD - 1) == _MARK
            if writes:
                os.pwrite(fd, f"{token} {os.getpid()}".encode().ljust(RECORD - 1) + _MARK, 0)
        permit = self.granted = Permit(token, list(self.held.values()), self.presence, writes)
        self.held.clear()
        self.presence = None
        self._let_gate_go()
        return token, took_over, permit

    # ------------------------------------------------------------------------ giving up

    def leave(self) -> None:
        """The caller gave up (or a try failed): hold nothing, wait for nothing, mark nothing."""
        shared = self.shared
        if self.granted is not None:  # granted as its caller gave up: pass it on
            permit, self.granted = self.granted, None
            self.release(permit, released=True)
        for wait in self.waits.values():
            drop(shared, wait)
        self.waits.clear()
        if self.gate_wait is not None:
            drop(shared, self.gate_wait)
            self.gate_wait = None
        for fd in self.held.values():
            self._let_go(fd)
        self.held.clear()
        self._let_gate_go()
        self.marked = self.marked and unmark(self.shared, self.key)
        if self.presence is not None:
            close_tracked(shared, self.presence)
            self.presence = None

    def _let_gate_go(self) -> None:
        if self.gate is not None:
            if self.gate_held:
                unlock(self.gate)
            close_tracked(self.shared, self.gate)
            self.gate, self.gate_held = None, False

    def _let_go(self, fd: int) -> None:
        try:
            unlock(fd)
        finally:
            close_tracked(self.shared, fd)

    def _failed(self, error: Exception) -> BackendUnavailable:
        return BackendUnavailable(
            f"waiting for a permit file of {self.key!r} failed ({error}); retry, or check the "
            "lock directory's file system",
            key=self.key,
        )

    # ------------------------------------------------------------------------- release

    def release(self, permit: Permit, *, released: bool) -> None:
        """Let *permit* go; *released*: its holder released it while live (its records say
        so before anyone else can read them). Steps aside if others wait at the gate."""
        shared = self.shared
        fds, permit.fds = permit.fds, []
        try:
            if released and permit.writes:
                for fd in fds:
                    os.pwrite(fd, _FREED, RECORD - 1)
            # (a fairness hint: a closed backend's directory, or a full disk, only skips it)
            with contextlib.suppress(OSError, BackendUnavailable):
                note_release(self.shared, self.files, self.key, self.base)
        finally:
            for fd in fds:  # (closing our only descriptor of a file drops its flock anyway)
                with contextlib.suppress(OSError):
                    unlock(fd)
                close_tracked(shared, fd)
            close_tracked(shared, permit.presence)
