"""One timer per event loop for the replies awaited at the client's socket timeout.

A call with no bound of its own waits at most the socket timeout for its reply. An
``asyncio.timeout`` per call costs a context manager, a timer handle and its cancellation on
every script call, most of the client's time around a sub-millisecond reply; these calls all
share one limit, so one timer serves them all, armed for the oldest call in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

__all__ = ["Watchdog"]


class _Conn(Protocol):
    _writer: asyncio.StreamWriter | None


class Watchdog:
    """Bounds the replies awaited on one event loop's connections to *limit* seconds each.

    A reply still awaited *limit* s after :meth:`start` has its connection aborted (its read
    ends at once) and :meth:`done` returns True, for the caller to raise its timeout. Exact:
    every call has the same limit, so calls fall due in the order they started, and the one
    timer is always armed for the oldest call still in flight.
    """

    __slots__ = ("_due", "_expired", "_loop", "_timer", "limit")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.limit = limit
        self._loop = loop
        self._due: dict[_Conn, float] = {}  # in start order, so in due order
        self._expired: set[_Conn] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, conn: _Conn) -> None:
        """*conn* awaits a reply from now on."""
        due = self._loop.time() + self.limit
        self._due.pop(conn, None)  # (a key set again would keep its old place in the order)
        self._due[conn] = due
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._fire)

    def done(self, conn: _Conn) -> bool:
        """*conn*'s reply came, or its wait ended otherwise: True if it had run out of time
        (its connection was aborted)."""
        self._due.pop(conn, None)
        if not self._expired:
            return False
        try:
            self._expired.remove(conn)
        except KeyError:
            return False
        return True

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        for conn, due in list(self._due.items()):
            if due > now:  # the oldest call still in time: wake up again when it falls due
                self._timer = self._loop.call_at(due, self._fire)
                return
            del self._due[conn]
            self._expired.add(conn)
            writer = conn._writer
            if writer is not None:
                writer.transport.abort()  # its read returns at once, with nothing

    def close(self) -> None:
        """Stop the timer (the loop's wire is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
