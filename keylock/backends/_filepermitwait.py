"""How a permit claim waits for another process: a pool thread blocks in flock on the claim's
own open file (of the ticket ahead in line, or of a slot), so the kernel wakes it at the
other claim's unlock, and then wakes the claim's caller; no polling.

A blocking flock cannot be interrupted, so a caller that gives up leaves the thread to it: the
thread lets the lock go the moment it gets it (:attr:`Blocked.wanted` is then False), and
nothing is left behind once the holder it waited for lets go. Only when the pool of
:mod:`~keylock.backends._filewait` is full does a claim poll instead.
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING

from ._fileshared import close_tracked, unlock
from ._filewait import _POOL

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._fileshared import Shared

__all__ = ["RECORD", "Blocked", "block", "drop", "read_gate"]

RECORD = 128  # bytes of the gate's and the slots' records


class Blocked:
    """One flock a pool thread waits in for a claim, on the claim's own open file *fd*: how
    it ended (:attr:`done`, :attr:`error`), and whether the claim still wants it."""

    __slots__ = ("done", "error", "fd", "how", "wanted")

    def __init__(self, fd: int, how: int) -> None:
        self.fd = fd
        self.how = how  # fcntl.LOCK_EX or fcntl.LOCK_SH
        self.done = False  # the flock returned: fd holds the lock unless error
        self.error: Exception | None = None
        self.wanted = True  # False once the claim gave it up: the thread lets it go


def block(shared: Shared, blocked: Blocked, wake: Callable[[], bool]) -> bool:
    """Have a pool thread block in flock for *blocked*, then call *wake* (or let the lock go
    if the claim no longer wants it); False if the pool is full (the claim polls)."""
    return _POOL.submit(lambda: _wait(shared, blocked, wake))


def _wait(shared: Shared, blocked: Blocked, wake: Callable[[], bool]) -> None:
    error: Exception | None = None
    try:
        fcntl.flock(blocked.fd, blocked.how)  # (EINTR is retried: PEP 475)
    except Exception as exc:  # the claim raises it
        error = exc
    with shared.mutex:
        blocked.done, blocked.error = True, error
        wanted = blocked.wanted
    if wanted and wake():
        return  # the claim takes the lock, or gives up and lets it go (see drop)
    with shared.mutex:
        if wanted:  # its event loop is closed: nobody will come back for it
            if not blocked.wanted:
                return  # the claim left the line meanwhile (in wake) and let it go
            blocked.wanted = False
            blocked.error = blocked.error or OSError("the waiting caller's event loop closed")
    _let_go(shared, blocked, error is None)


def drop(shared: Shared, blocked: Blocked) -> None:
    """The claim gives *blocked* up: let its lock go now if the thread is done, else have the
    thread let it go when it gets it. Never raises."""
    with shared.mutex:
        if not blocked.wanted:
            return
        blocked.wanted = False
        done = blocked.done
    if done:
        _let_go(shared, blocked, blocked.error is None)


def _let_go(shared: Shared, blocked: Blocked, locked: bool) -> None:
    try:
        if locked:
            unlock(blocked.fd)
    except OSError:
        pass
    finally:
        close_tracked(shared, blocked.fd)


def read_gate(fd: int) -> tuple[int, int]:
    """(last token, grant sequence number) of a gate file (0, 0 for a new one)."""
    fields = os.pread(fd, RECORD, 0).split()
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return 0, 0
