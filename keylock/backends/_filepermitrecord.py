"""What a permit's files record, so that its next holder knows whether it took over from a
holder that died (or lapsed) rather than one that released: ``took_over``.

* An exclusive slot (``.slot<i>``, and ``.rw`` under a writer) records ``token pid`` and
  ``H`` while held, ``R`` once released: a grant that finds ``H`` follows a dead holder.
* Readers share ``.rw``: it counts them. At ``RECORD`` the number of readers granted
  (written by each reader's grant, under the gate's lock), and each reader that releases
  appends one byte to the file (O_APPEND: atomic, no lock): the readers released are the
  bytes past ``RW_END``. Fewer released than granted, with no reader holding, means one
  died. A writer (which holds ``.rw`` alone) and a reader that finds no other reader
  holding are told, and start the count afresh; a reader granted beside live readers cannot
  tell theirs from a dead one's, and is not told (its room was not the dead one's). The
  count starts afresh then, or after _AFRESH readers with none holding: the file grows by
  a byte per reader while readers overlap without a pause.
"""

from __future__ import annotations

import fcntl
import os

from ._filepermitwait import RECORD
from ._fileshared import try_flock, unlock

__all__ = ["RW_END", "granted", "pid", "read_holder", "readers", "released"]

_MARK = b"H"  # an exclusive slot's record: granted; _FREED: its holder released it
_FREED = b"R"
_COUNT = 24  # bytes of the readers' count, after the record
RW_END = RECORD + _COUNT
_AFRESH = 4096  # released readers counted before the count starts afresh (none holding)
_APPEND = os.O_APPEND | os.O_NONBLOCK  # (a permit file's status flags: O_NONBLOCK, see open)
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def pid() -> int:
    """This process's id (os.getpid() is a system call)."""
    return _PID[0]


def granted(fds: list[int], token: int, how: int, rw: bool, owner: bytes) -> bool:
    """Record the grant of *token* to *owner* on the permit files *fds* we just locked
    (*how*; *rw*: the ``.rw`` file); True if it took over from a holder that died or
    lapsed."""
    record = _record(token, owner)
    if rw:
        return _rw_granted(fds[0], record, how)
    took_over = False
    for fd in fds:
        took_over = os.pread(fd, 1, RECORD - 1) == _MARK or took_over
        os.pwrite(fd, record, 0)
    return took_over


def _record(token: int, owner: bytes) -> bytes:
    return f"{token} {_PID[0]} {owner.hex()}".encode().ljust(RECORD - 1) + _MARK


def read_holder(raw: bytes) -> tuple[int | None, int | None, str | None]:
    """``(token, pid, owner hex)`` of an exclusive slot's record *raw* (None: not known)."""
    fields = raw[: RECORD - 1].split()
    numbers = [int(f) if f.isdigit() else None for f in fields[:2]] + [None, None]
    owner = fields[2].decode("ascii", "replace") if len(fields) > 2 else None
    return numbers[0], numbers[1], owner


def _rw_granted(fd: int, record: bytes, how: int) -> bool:
    raw = os.pread(fd, 1 + _COUNT, RECORD - 1)
    took_over = raw[:1] == _MARK  # (a writer that died)
    fields = raw[1:].split()
    count = int(fields[0]) if fields and fields[0].isdigit() else 0
    if count:
        done = max(os.fstat(fd).st_size - RW_END, 0)
        # a writer holds .rw alone: every reader not done died; a reader looks
        dead = done < count and (how == fcntl.LOCK_EX or _alone(fd))
        if dead or done >= max(count, _AFRESH):
            took_over = took_over or dead
            count = 0
            os.ftruncate(fd, RW_END)
    if how == fcntl.LOCK_EX:
        os.pwrite(fd, record + str(count).encode().ljust(_COUNT), 0)
    else:
        os.pwrite(fd, str(count + 1).encode().ljust(_COUNT), RECORD)
    return took_over


def readers(fd: int) -> int:
    """Of the ``.rw`` file *fd*: readers granted and not released (live, or dead since)."""
    fields = os.pread(fd, _COUNT, RECORD).split()
    count = int(fields[0]) if fields and fields[0].isdigit() else 0
    return max(count - max(os.fstat(fd).st_size - RW_END, 0), 0)


def _alone(fd: int) -> bool:
    """True if no other reader holds ``.rw`` (*fd*, our LOCK_SH). We are first in line, under
    the gate's lock: no other claim takes ``.rw`` meanwhile, so our lock is let go for the
    look and taken back at once (a waiter that gave up may hold it for µs: flock waits)."""
    unlock(fd)
    try:
        return try_flock(fd, fcntl.LOCK_EX)
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH)  # (from LOCK_EX, or from nothing)


def released(fds: list[int], how: int, rw: bool, live: bool) -> None:
    """Record the release of the permit files *fds* (before they are unlocked); *live*: its
    holder released it in time (else it stays recorded as not released: took over)."""
    if not live:
        return
    if how == fcntl.LOCK_EX:
        for fd in fds:
            os.pwrite(fd, _FREED, RECORD - 1)
    elif rw:
        fd = fds[0]
        fcntl.fcntl(fd, fcntl.F_SETFL, _APPEND)
        os.write(fd, b"r")
