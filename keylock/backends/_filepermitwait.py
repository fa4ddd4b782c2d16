"""How a permit claim waits for another process: a pool thread blocks in flock on the claim's
own open file (the gate, or a slot), so the kernel wakes it at the holder's unlock, and then
wakes the claim's caller; no polling.

A blocking flock cannot be interrupted, so a caller that gives up leaves the thread to it: the
thread lets the lock go the moment it gets it (:attr:`Blocked.wanted` is then False), and
nothing is left behind once the holder it waited for lets go. Only when the pool of
:mod:`~keylock.backends._filewait` is full does a claim poll instead.
"""

from __future__ import annotations

import fcntl
import os
import time
import weakref
from typing import TYPE_CHECKING

from ._fileshared import STEP_ASIDE, close_tracked, others_wait, say_waiting, unlock
from ._filewait import _POOL, take_turn

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._filepaths import LockDirectory
    from ._fileshared import Shared

__all__ = [
    "RECORD",
    "Blocked",
    "block",
    "drop",
    "mark",
    "note_release",
    "read_gate",
    "stepping_aside",
    "unmark",
]

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


def block(
    shared: Shared,
    blocked: Blocked,
    wake: Callable[[], bool],
    aside: Callable[[], bool] | None = None,
) -> bool:
    """Have a pool thread block in flock for *blocked*, then call *wake* (or let the lock go
    if the claim no longer wants it); False if the pool is full (the claim polls)."""
    return _POOL.submit(lambda: _wait(shared, blocked, wake, aside))


def _wait(
    shared: Shared, blocked: Blocked, wake: Callable[[], bool], aside: Callable[[], bool] | None
) -> None:
    error: Exception | None = None
    try:
        if blocked.how == fcntl.LOCK_EX:
            take_turn(blocked.fd, aside, lambda: blocked.wanted)
        else:
            fcntl.flock(blocked.fd, blocked.how)
    except Exception as exc:  # the claim raises it
        error = exc
    with shared.mutex:
        blocked.done, blocked.error = True, error
        wanted = blocked.wanted
    if wanted and wake():
        return  # the claim takes the lock, or gives up and lets it go (see drop)
    with shared.mutex:
        if wanted:  # its event loop is closed: nobody will come back for it
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


class _Marks:
    """Per process and lock directory: the waiting marks on ``.wait`` files and the keys this
    process steps aside at. A POSIX lock is the process's, and any close of the file drops
    it: so one descriptor per key, kept while any caller here is marked."""

    def __init__(self) -> None:
        self.wait: dict[str, list[int]] = {}  # key -> [fd, callers marked]
        self.aside: dict[str, tuple[int, float]] = {}  # key -> (gate seq at release, until)


_MARKS: weakref.WeakKeyDictionary[Shared, _Marks] = weakref.WeakKeyDictionary()


def _marks(shared: Shared) -> _Marks:
    marks = _MARKS.get(shared)
    if marks is None:
        marks = _MARKS[shared] = _Marks()
    return marks


os.register_at_fork(after_in_child=_MARKS.clear)  # (the parent's fds: Shared closes them)


def mark(shared: Shared, files: LockDirectory, key: str, base: str) -> bool:
    """Count one more caller of this process waiting at *key*'s gate (marked on the first);
    True (the caller is counted: :func:`unmark` it)."""
    marks = _marks(shared)
    with shared.mutex:
        entry = marks.wait.get(key)
        if entry is None:
            fd = files.open_file(key, base + ".wait")
            shared.fds.add(fd)
            entry = marks.wait[key] = [fd, 0]
        if entry[1] == 0:
            for _ in range(8):  # a releaser probing this instant: it is done in µs
                if say_waiting(entry[0]):
                    break
                os.sched_yield()
        entry[1] += 1
    return True


def unmark(shared: Shared, key: str) -> bool:
    """One caller fewer waiting at *key*'s gate (the mark goes with the last); False."""
    marks = _marks(shared)
    with shared.mutex:
        entry = marks.wait[key]
        entry[1] -= 1
        if entry[1] == 0:
            del marks.wait[key]
            shared.fds.discard(entry[0])
            os.close(entry[0])  # (drops our mark)
    return False


def stepping_aside(shared: Shared, files: LockDirectory, key: str, base: str, gate: int) -> bool:
    """True while this process owes the processes waiting at *key*'s gate (our open *gate*
    file) their turn: until two grants went by, or nobody is marked waiting any more (a
    process stepping aside is not marked itself: two of them would wait for each other)."""
    marks = _marks(shared)
    aside = marks.aside.get(key)
    if aside is None:
        return False
    seq_then, until = aside
    if (
        time.monotonic() < until
        and read_gate(gate)[1] < seq_then + 2
        and _others_marked(shared, files, key, base)
    ):
        return True
    marks.aside.pop(key, None)
    return False


def _others_marked(shared: Shared, files: LockDirectory, key: str, base: str) -> bool:
    """True if another process is marked waiting at *key*'s gate."""
    with shared.mutex:  # (our marks' descriptor: closing another would drop them)
        entry = _marks(shared).wait.get(key)
        fd = entry[0] if entry else files.open_file(key, base + ".wait")
        try:
            return others_wait(fd)
        finally:
            if entry is None:
                os.close(fd)


def note_release(shared: Shared, files: LockDirectory, key: str, base: str) -> None:
    """After a release of a permit of *key*: if another process waits at its gate, step
    aside there (see :func:`stepping_aside`)."""
    if not _others_marked(shared, files, key, base):
        return
    seq = read_gate_named(files, key, base)
    marks = _marks(shared)
    now = time.monotonic()
    aside = marks.aside
    for stale in [k for k, (_, until) in aside.items() if until <= now]:
        del aside[stale]
    aside[key] = (seq, now + STEP_ASIDE)


def read_gate_named(files: LockDirectory, key: str, base: str) -> int:
    """The grant sequence number of *key*'s gate file (0 if there is none)."""
    fd = files.open_name(base + ".gate")
    if fd is None:
        return 0
    try:
        return read_gate(fd)[1]
    finally:
        os.close(fd)
