"""The acquires of one process that wait at the Postgres server, and the listener that wakes
them: a release that hands a key to one of them NOTIFYs this process's channel with the
waiter's owner id, and only that waiter tries again at once."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._background import Listener
    from ._flow import PostgresFlow

__all__ = ["Waiting"]

_STARTUP_POLL = 0.05  # the safety-net poll while the listener is not LISTENing yet


class Waiting:
    """Owner id -> its waiting acquire; the listener starts when the first of them is put in
    line (an acquire granted at once never needs it: a process that never waits holds no
    LISTEN session)."""

    def __init__(self, conninfo: str, connect_kwargs: dict[str, object], channel: str) -> None:
        self.conninfo, self.connect_kwargs, self.channel = conninfo, connect_kwargs, channel
        self._mutex = threading.Lock()
        self._flows: dict[bytes, PostgresFlow] = {}
        self._listener: Listener | None = None

    def add(self, flow: PostgresFlow) -> None:
        with self._mutex:
            self._flows[flow.owner] = flow

    def listen(self) -> None:
        """An acquire was put in line: make sure the listener runs (once LISTENing, it wakes
        every waiter to try again, so a hand-off made before that is not missed)."""
        if self._listener is None:
            with self._mutex:
                if self._listener is None:
                    from ._background import Listener

                    self._listener = Listener(self)

    def forget(self, flow: PostgresFlow) -> None:
        with self._mutex:
            if self._flows.get(flow.owner) is flow:
                del self._flows[flow.owner]

    def poll(self, poll: float) -> float:
        """The safety-net poll: *poll*, or short until the listener is LISTENing."""
        listener = self._listener
        return poll if listener is not None and listener.ready.is_set() else _STARTUP_POLL

    def woken(self, payload: str) -> None:
        """A release handed a key to the waiter *payload* (its owner id in hex): wake it."""
        try:
            owner = bytes.fromhex(payload)
        except ValueError:
            return
        with self._mutex:
            flow = self._flows.get(owner)
        if flow is not None:
            flow.woken = True
            flow.waiter.wake()

    def wake_all(self) -> None:
        """The listener (re)connected: a hand-off may have been missed; every waiter tries."""
        with self._mutex:
            flows = list(self._flows.values())
        for flow in flows:
            flow.woken = True
            flow.waiter.wake()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
