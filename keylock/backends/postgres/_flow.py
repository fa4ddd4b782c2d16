"""The decisions of one acquire at Postgres, with no I/O (see :class:`~.._tiered.Flow`).

A trip is one call of ``<table>_acquire``: granted, or queued (and how long the holder has
left, and the server's clock). Between trips the caller waits until its process's listener is
notified that a release handed it the key (the grant is in the message: adopted while its
claim window has room to spare, else asked for), the holder's lease runs out, or the
safety-net poll comes round (which also keeps its place in line alive: a waiter that stops
coming back leaves the line).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, cast

from .._tiered import Flow, Step
from ..base import Grant

if TYPE_CHECKING:
    from collections.abc import Hashable

    from .._waiters import Waiter
    from ..base import Deadline
    from ._waiting import Handed, ServerClock

__all__ = ["LEAVE", "QUEUE", "TRY", "PostgresFlow"]

TRY = "try"  # one try, without queueing (timeout=0)
QUEUE = "queue"  # try, and take (or keep) a place in line
LEAVE = "leave"  # leave the line; a key handed over meanwhile is passed on
_AFTER_EXPIRY = 0.002  # look this long after the holder's lease should have run out


class PostgresFlow(Flow):
    """Tries at once; then after each wake-up, at the holder's expiry, or every ``poll`` s."""

    woken = False  # set by the listener thread before it wakes the waiter: try again now
    handed: Handed | None = None  # set by the listener with woken: the grant handed to us
    sent_wall = 0.0  # time.time() when the last try was sent (to read the server's clock)
    sent_at = 0.0  # time.monotonic() when the last try was sent (a grant's TTL runs from it)
    _due = -math.inf  # time.monotonic() of the next try
    _queued = False  # a try that takes a place in line was sent
    closed = False  # its backend's close took it out of line (set under the Waiting mutex)
    leave_sql = ""  # the statement that takes this caller out of the line (set by its backend)

    def __init__(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
        poll: float,
        clock: ServerClock,
    ) -> None:
        super().__init__(key, owner, ttl, deadline, waiter, local)
        self.poll = poll  # seconds between safety-net tries (the backend may shorten it)
        self._queue = deadline.timeout != 0
        self._clock = clock

    def next(self, now: float) -> Step | None:
        if self.grant is not None:
            return None
        handed, self.handed = self.handed, None
        # a claim window with room to spare: the renewer extends it in time. One overslept
        # (a busy process) may have lapsed and gone to another: ask the server, which grants
        # it again only if it is still ours
        if handed is not None and handed.deadline - now > handed.claim / 2:
            self.grant = Grant(handed.token, None, handed.deadline, handed.took_over)
            return None
        if self.woken or now >= self._due:
            self.woken = False
            self.sent_at = now
            self.sent_wall = time.time()
            if self._queue:
                self._queued = True
                return Step(QUEUE, None)
            return Step(TRY, None)
        return Step(None, self._due - now)

    def on_reply(self, reply: object, now: float) -> None:
        status, token, ms_left, took_over = cast("tuple[int, int, int, bool | None]", reply)
        if status == 1:
            # the lease runs from when the try was sent: never later than the server's
            lapses = self.sent_at + ms_left / 1000
            if lapses > now:
                self.grant = Grant(int(token), None, lapses, bool(took_over))
                return
            # the reply came after the lease it grants ran out (a statement stalled longer
            # than the TTL): never return it; ask again, which renews it if still ours
            if self.deadline.passed(now):
                raise self.deadline.expired()
            self._due = now
            return
        self._clock.read(int(token), self.sent_wall, time.time())
        if self.deadline.passed(now):
            raise self.deadline.expired()
        wait = self.poll
        if ms_left >= 0:  # held: look again when it runs out, if nobody wakes us first
            wait = min(wait, ms_left / 1000 + _AFTER_EXPIRY)
        self._due = min(now + wait, self.deadline.at)

    def leaving(self) -> Hashable | None:
        return LEAVE if self._queued else None
