"""Permits between processes on one host (FileBackend semaphores and RW locks): a dead
holder's permit is freed by the OS, waiters sleep in flock, tokens rise across all permits.

Files of a permit key, next to the lock files (``<readable>.<hash>`` as for a lock, so the
same path rules and refusals apply; other suffixes: the permit keyspace is not the lock's):

* ``.slot<i>`` (i < limit), for a semaphore: each held permit of weight w holds LOCK_EX on w
  slot files. An RW lock (limit ``RW_LIMIT``) has one file, ``.rw``: a reader holds LOCK_SH,
  a writer LOCK_EX. The OS drops a dead holder's flocks: its permit is free at once.
* ``.gate``: the line and the tokens. A claim granted on arrival (nobody in line, room
  free) is granted under the gate's short LOCK_EX; any other takes a ticket there and waits
  its turn in the line (:mod:`~keylock.backends._filepermitline`: arrival order across
  processes, a dead claim skipped), then, as the head of the line, for the room it needs; a
  later claim of any weight queues behind it (a waiting writer blocks the readers that come
  after it, in every process). The gate file holds the key's token record: ``token seq pid
  owner``, rewritten under the gate's LOCK_EX, token = ``max(last + 1, now in µs)``, so
  tokens strictly increase across permits, weights and processes and are never reused.
* ``.join``: the limit in use. Every holder and waiter holds LOCK_SH on ``.join`` (the OS
  drops it with the process); a claim joins under the gate's LOCK_EX: if nobody holds
  ``.join`` it writes its limit in the gate file, else it must match the one written
  (LimitMismatch otherwise, nothing granted). The record goes with the last holder or waiter.
  A key nobody holds or waits for (``.join`` free) may be pruned: its files go, under the
  gate's lock (:func:`~keylock.backends._filepermitline.prune_permit_files`).

``took_over``: what the permit files record of their last holders
(:mod:`~keylock.backends._filepermitrecord`).

Waiting: in a pool thread's flock (:mod:`~keylock.backends._filepermitwait`), on the ticket
ahead in line, then on every slot the claim lacks (the first to come is taken, the others let
go); a sync caller without a deadline waits for its turn in line in flock itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING, TypeAlias

from ..errors import BackendUnavailable
from ._filepaths import file_name
from ._filepermitline import (
    GATE_SIZE,
    LIMIT,
    LIMIT_SIZE,
    LINE,
    LINE_SIZE,
    line_record,
    lock_gate,
    now_token,
    parse_line,
    parse_record,
    sweep,
    ticket,
)
from ._filepermitrecord import granted, pid
from ._filepermitrecord import released as record_release
from ._filepermitturn import InLine
from ._filepermitwait import RECORD, Blocked, block, drop, read_gate
from ._fileshared import close_tracked, try_flock, unlock
from ._filewait import BLOCKED
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
_REOPEN = 8  # times a claim reopens a gate file pruned as it came, before it polls
_QUEUED = "queued"  # a claim took a ticket: it waits for its turn


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

    __slots__ = ("fds", "presence", "token")

    def __init__(self, token: int, fds: list[int], presence: int) -> None:
        self.token = token
        self.fds = fds
        self.presence = presence


class Claim(InLine):
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
        self.limit, self._wake_caller, self.mismatch = limit, wake, mismatch
        self._orphaned = False  # its caller's event loop closed: it left the line (mutex)
        self.on_orphaned: Callable[[], None] | None = None  # then called: drop the caller's turn
        base = _base(key)
        self.base = base
        self.rw = limit == RW_LIMIT
        if self.rw:
            self.slots = [base + ".rw"]
            self.how = fcntl.LOCK_EX if weight == RW_LIMIT else fcntl.LOCK_SH
            self.need = 1
        else:
            self.slots = [f"{base}.slot{i}" for i in range(limit)]
            self.how, self.need = fcntl.LOCK_EX, weight
        self.presence: int | None = None
        self.gate: int | None = None  # our open gate file; gate_locked while we lock it
        self.gate_locked = False
        self.ticket: int | None = None  # our place in line, and its file (LOCK_EX)
        self.ticket_fd = -1
        self.served = 0  # a lower bound of the line's served tickets
        self.ahead = 0  # every ticket from this one to ours is done
        self.ahead_wait: Blocked | None = None  # a thread's flock on that ticket's file
        self.head = False  # every ticket before ours is done: we wait for room
        self.held: dict[int, int] = {}  # slot index -> our locked fd
        self.waits: dict[int, Blocked] = {}  # slot index -> a thread's flock for it
        self.granted: Permit | None = None  # granted, not yet taken by its caller

    def wake(self) -> bool:
        """A pool thread's flock for this claim ended: wake its caller. False if the caller's
        event loop is closed: nobody will come back for the claim, so it leaves the line
        here (ticket, slots, gate), or every later claim of the key, in any process, would
        wait behind it until this process exits; and :attr:`on_orphaned` passes its caller's
        in-process turn on."""
        if self._wake_caller():
            return True
        with self.shared.mutex:
            first, self._orphaned = not self._orphaned, True
        if first:  # (each of its flocks' threads finds it out: one leaves)
            try:
                self.leave()
            finally:
                if self.on_orphaned is not None:
                    self.on_orphaned()
        return False

    def _open(self, suffix_name: str) -> int:
        with self.shared.mutex:  # tracked, so a fork's child closes it (see Shared.fds)
            fd = self.files.open_file(self.key, suffix_name)
            self.shared.fds.add(fd)
        return fd

    # ---------------------------------------------------------------------------- joining

    def _join(self, raw: bytes) -> None:
        """Under the gate's lock (its record *raw*): hold LOCK_SH on ``.join``, with our limit
        recorded in the gate if nobody else holds or waits; LimitMismatch on another limit."""
        gate = self.gate
        assert gate is not None
        pfd = self._open(self.base + ".join")
        try:
            text = raw[LIMIT:].split()
            recorded = int(text[0]) if text and text[0].isdigit() else None
            if try_flock(pfd):  # nobody holds or waits: our limit is the key's
                if recorded != self.limit:  # (and the key, for `keylock inspect`)
                    shown = self.key.encode("utf-8", "surrogatepass").hex()
                    os.pwrite(
                        gate, f"{self.limit}".ljust(LIMIT_SIZE).encode() + shown.encode(), LIMIT
                    )
            elif recorded != self.limit:
                raise self.mismatch(self.key, recorded or 0, self.limit)
            # (from LOCK_EX, maybe not atomically: harmless, everyone joins under the gate)
            if not try_flock(pfd, fcntl.LOCK_SH):  # only SH is held: cannot fail
                raise BackendUnavailable(f"cannot join the permits of {self.key!r}", key=self.key)
        except BaseException:
            close_tracked(self.shared, pfd)
            raise
        self.presence = pfd

    # ------------------------------------------------------------------------------ steps

    def step(self, *, block_: bool, try_only: bool = False, inline: bool = False) -> object:
        """*inline*: a caller that can only give up on a signal (sync, no deadline) waits for
        its turn in line in flock itself, as on the lock path (no thread hop per turn)."""
        if not self.head:
            if self.ticket is None:
                got = self._arrive(try_only)
                if got is not _QUEUED:
                    return got
            got = self._take_turn(block_, inline)
            if got is not True:
                return got
        return self._take_capacity(block_, try_only)

    def _arrive(self, try_only: bool) -> object:
        """Under the gate's short lock: a grant if nobody is in line and the room is free;
        else (unless *try_only*: None) take the next ticket, and _QUEUED."""
        for _ in range(_REOPEN):
            if self.gate is None:
                self.gate = self._open(self.base + ".gate")
            if not lock_gate(self.gate):
                return None
            self.gate_locked = True
            if os.fstat(self.gate).st_nlink:
                break
            self._let_gate_go()  # pruned as we came: the file at the path is the gate now
        else:
            return None
        try:
            raw = os.pread(self.gate, GATE_SIZE, 0)
            if self.presence is None:
                self._join(raw)
            served, following = parse_line(raw[LINE : LINE + LINE_SIZE])
            swept = served
            if served + 1 < following:
                swept = sweep(self.files, self.base, served, following)
            if swept + 1 == following:  # nobody in line
                self._try_capacity()
                if len(self.held) >= self.need:
                    if swept != served:
                        os.pwrite(self.gate, line_record(swept, following), LINE)
                    return self._grant(raw)
            if try_only:
                return None
            number = following
            while True:  # (a ticket file someone holds: the line restarted under it; skip)
                fd = self._open(ticket(self.base, number))
                if try_flock(fd):
                    break
                close_tracked(self.shared, fd)
                number += 1
            self.ticket, self.ticket_fd = number, fd
            self.served, self.ahead = swept, number
            os.pwrite(self.gate, line_record(swept, number + 1), LINE)
        finally:
            self._unlock_gate()
        return _QUEUED

    def _try_capacity(self) -> None:
        """Take, without waiting, the slots this claim still lacks and finds free."""
        for index, name in enumerate(self.slots):
            if len(self.held) >= self.need:
                break
            if index in self.held or index in self.waits:
                continue
            fd = self._open(name)
            if try_flock(fd, self.how):
                self.held[index] = fd
            else:
                close_tracked(self.shared, fd)

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
        self._try_capacity()
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

    def _grant(self, raw: bytes = b"") -> Granted | None:
        """We hold our capacity (and are first in line): under the gate's lock, mint the
        token, record it, mark our ticket served; None if the gate stays busy (poll). *raw*:
        the gate's record, if read under this lock."""
        gate = self.gate
        assert gate is not None
        assert self.presence is not None
        if not self.gate_locked:
            if not lock_gate(gate):
                return None
            self.gate_locked = True
        for wait in self.waits.values():
            drop(self.shared, wait)
        self.waits.clear()
        try:
            last, seq = parse_record(raw) if raw else read_gate(gate)
            token = now_token(last)
            line = f"{token} {seq + 1} {pid()} {self.owner.hex()}\n".encode().ljust(RECORD)
            os.pwrite(gate, line, 0)
            if self.ticket is not None:
                served, following = parse_line(os.pread(gate, LINE_SIZE, LINE))
                os.pwrite(gate, line_record(max(served, self.ticket), following), LINE)
            took_over = granted(list(self.held.values()), token, self.how, self.rw, self.owner)
        finally:
            self._let_gate_go()
        self._leave_line()
        permit = self.granted = Permit(token, list(self.held.values()), self.presence)
        self.held.clear()
        self.presence = None
        return token, took_over, permit

    # ------------------------------------------------------------------------ giving up

    def leave(self) -> None:
        """The caller gave up (or a try failed): hold nothing, wait for nothing, keep no
        place in line."""
        shared = self.shared
        if self.granted is not None:  # granted as its caller gave up: pass it on
            permit, self.granted = self.granted, None
            self.release(permit, released=True)
        for wait in self.waits.values():
            drop(shared, wait)
        self.waits.clear()
        if self.ahead_wait is not None:
            drop(shared, self.ahead_wait)
            self.ahead_wait = None
        for fd in self.held.values():
            self._let_go(fd)
        self.held.clear()
        self._let_gate_go()
        self._leave_line()
        if self.presence is not None:
            close_tracked(shared, self.presence)
            self.presence = None

    def _unlock_gate(self) -> None:
        if self.gate is not None and self.gate_locked:
            self.gate_locked = False
            unlock(self.gate)

    def _let_gate_go(self) -> None:
        if self.gate is not None:  # (closing our only descriptor of it drops its lock)
            close_tracked(self.shared, self.gate)
            self.gate, self.gate_locked = None, False

    # ------------------------------------------------------------------------- release

    def release(self, permit: Permit, *, released: bool) -> None:
        """Let *permit* go; *released*: its holder released it while live (its records say
        so before anyone else can read them)."""
        shared = self.shared
        fds, permit.fds = permit.fds, []
        try:
            record_release(fds, self.how, self.rw, released)
        finally:
            for fd in fds:  # (unlocked, not only closed: a forked child may share the file)
                with contextlib.suppress(OSError):
                    unlock(fd)
                close_tracked(shared, fd)
            close_tracked(shared, permit.presence)
