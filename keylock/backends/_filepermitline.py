"""The line of a permit key between processes: claims are served in the order they arrived
(a ticket each), whatever process they are in, and a claim whose process dies leaves it.

The line lives in the key's ``.gate`` file, after its token record: ``served next``. A claim
that cannot be granted at once takes ticket ``next`` under a short LOCK_EX of the gate: it
creates the ticket's file ``.t<n>`` and holds LOCK_EX on it until it is served or gives up
(the OS drops it if its process dies). Every ticket up to ``served`` is done. A claim is the
head of the line once every ticket between ``served`` and its own is done: it waits, in a
blocking LOCK_SH flock, on the newest ticket before its own that is not, so the kernel wakes
it when that claim leaves the line (served, gave up, or died), then looks further down. A
ticket's file goes with it (its holder unlinks it; an arrival sweeps a dead one's), so a
done ticket is a missing file or one nobody locks.

Only the head waits for room: a later claim of any weight waits behind it, so a waiting
writer blocks the readers that arrive after it, in every process.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import TYPE_CHECKING

from ._fileshared import try_flock, unlock

if TYPE_CHECKING:
    from ._filepaths import LockDirectory

__all__ = [
    "GATE_SIZE",
    "LIMIT",
    "LIMIT_SIZE",
    "LINE",
    "LINE_SIZE",
    "lock_gate",
    "newest_waiting",
    "parse_line",
    "parse_record",
    "sweep",
    "ticket",
]

LINE = 128  # offset of the line record ``served next`` in the gate file (after the token's)
LINE_SIZE = 48
LIMIT = LINE + LINE_SIZE  # then the limit of the holders and waiters there are
LIMIT_SIZE = 24
GATE_SIZE = LIMIT + LIMIT_SIZE
_TRIES = 64  # yields for a short gate lock before a step says busy (held for µs at a time)


def ticket(base: str, number: int) -> str:
    """The file name of ticket *number* of the key whose files start with *base*."""
    return f"{base}.t{number}"


def parse_line(raw: bytes) -> tuple[int, int]:
    """``(served, next)`` from the line record *raw* (``(0, 1)`` for a new gate file)."""
    fields = raw.split()
    try:
        served, following = int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return 0, 1
    return served, max(following, served + 1)


def parse_record(raw: bytes) -> tuple[int, int]:
    """``(last token, grant sequence number)`` from a gate file's first bytes *raw*."""
    fields = raw[:LINE].split()
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return 0, 0


def line_record(served: int, following: int) -> bytes:
    return f"{served} {following}".encode().ljust(LINE_SIZE)


def lock_gate(gate: int, how: int = fcntl.LOCK_EX) -> bool:
    """Take the gate's short lock *how*; False if others kept it (a few µs each: poll)."""
    for _ in range(_TRIES):
        if try_flock(gate, how):
            return True
        os.sched_yield()
    return False


def sweep(files: LockDirectory, base: str, served: int, following: int) -> int:
    """*served*, moved past the done tickets at the front of the line (under the gate's
    LOCK_EX); a dead claim's ticket file is removed."""
    while served + 1 < following:
        name = ticket(base, served + 1)
        fd = files.open_name(name)
        if fd is not None:
            try:
                if not try_flock(fd, fcntl.LOCK_SH):
                    break  # its claim still waits
                files.unlink(name)  # (its claim died: a ticket number is never reused)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        served += 1
    return served


def newest_waiting(files: LockDirectory, base: str, served: int, below: int) -> tuple[int, int]:
    """``(ticket, open file)`` of the newest ticket between *served* and *below* whose claim
    still waits, or ``(served, -1)`` if none does (a claim with ticket *below* is the head)."""
    for number in range(below - 1, served, -1):
        name = ticket(base, number)
        fd = files.open_name(name)
        if fd is None:
            continue  # served, or given up
        if try_flock(fd, fcntl.LOCK_SH):  # its claim died (a ticket number is never reused)
            try:
                files.unlink(name)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
            continue
        return number, fd
    return served, -1


def wait_inline(fd: int) -> None:
    """Block until the claim holding ticket file *fd* leaves the line (a sync caller with no
    deadline waits in flock itself)."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    unlock(fd)


def now_token(last: int) -> int:
    """The next token after *last*: ``max(last + 1, now in µs)``."""
    return max(last + 1, time.time_ns() // 1000)
