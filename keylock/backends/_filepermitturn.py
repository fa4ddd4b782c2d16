"""A permit claim's place in the line of its key (see :mod:`~keylock.backends._filepermitline`):
waiting for its turn, kernel-woken, and leaving the line."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable
from ._filepermitline import (
    LINE,
    LINE_SIZE,
    lock_gate,
    newest_waiting,
    parse_line,
    ticket,
    wait_inline,
)
from ._filepermitwait import Blocked, block, drop
from ._fileshared import close_tracked, unlock
from ._filewait import BLOCKED

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._filepaths import LockDirectory
    from ._fileshared import Shared

__all__ = ["InLine"]


class InLine:
    """The line part of a :class:`~keylock.backends._filepermits.Claim`."""

    files: LockDirectory
    shared: Shared
    key: str
    base: str
    wake: Callable[[], bool]
    gate: int | None  # our open gate file
    ticket: int | None  # our place in line, and its file (LOCK_EX)
    ticket_fd: int
    served: int  # a lower bound of the line's served tickets
    ahead: int  # every ticket from this one to ours is done
    ahead_wait: Blocked | None  # a thread's flock on that ticket's file
    head: bool  # every ticket before ours is done: we wait for room

    def _take_turn(self, block_: bool, inline: bool) -> object:
        """True once every ticket before ours is done (we are the head of the line); else
        BLOCKED (a thread waits in flock on the newest one still waiting), or None."""
        shared = self.shared
        wait = self.ahead_wait
        if wait is not None:
            with shared.mutex:
                done = wait.done
            if not done:
                return BLOCKED
            self.ahead_wait = None
            drop(shared, wait)
            if wait.error is not None:
                raise self._failed(wait.error)
            self._sweep_ahead()
        gate = self.gate
        assert gate is not None
        while True:
            if lock_gate(gate, fcntl.LOCK_SH):  # (if not: the bound we have will do)
                self.served = max(self.served, parse_line(os.pread(gate, LINE_SIZE, LINE))[0])
                unlock(gate)
            with shared.mutex:  # tracked, so a fork's child closes it (see Shared.fds)
                self.ahead, fd = newest_waiting(self.files, self.base, self.served, self.ahead)
                if fd >= 0:
                    shared.fds.add(fd)
            if fd < 0:
                self.head = True
                return True
            if inline:
                try:
                    wait_inline(fd)
                finally:
                    close_tracked(shared, fd)
                self._sweep_ahead()
                continue
            blocked = Blocked(fd, fcntl.LOCK_SH)
            if not block_ or not block(shared, blocked, self.wake):
                close_tracked(shared, fd)
                return None  # (no waiting now, or the pool is full: poll)
            self.ahead_wait = blocked
            return BLOCKED

    def _sweep_ahead(self) -> None:
        """The claim ahead of us left the line: if it died, its ticket file is still there."""
        with contextlib.suppress(FileNotFoundError):  # (served or given up: gone already)
            self.files.unlink(ticket(self.base, self.ahead))

    def _leave_line(self) -> None:
        """Give our ticket up (served or not): its file goes first, then its lock, which
        wakes the claim behind us."""
        if self.ticket is None:
            return
        name, fd = ticket(self.base, self.ticket), self.ticket_fd
        self.ticket, self.ticket_fd, self.head = None, -1, False
        try:
            with contextlib.suppress(FileNotFoundError):  # (swept: our process was thought dead)
                self.files.unlink(name)
        finally:
            self._let_go(fd)

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
