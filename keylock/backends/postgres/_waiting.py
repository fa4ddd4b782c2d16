"""The acquires of one process that wait at the Postgres server, and the listener that wakes
them: a release that hands a key to one of them NOTIFYs this process's channel with the
waiter's owner id and the grant (token, when, claim window), and only that waiter wakes: it
adopts the grant from the message, without a round trip of its own."""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._background import Listener
    from ._flow import PostgresFlow

__all__ = ["Waiting"]

_STARTUP_POLL = 0.05  # the safety-net poll while the listener is not LISTENing yet


class Handed(NamedTuple):
    """A key handed to a waiter at a release: its token, the time.monotonic() at which its
    claim window closes (never later than the server's), the window's length, took over."""

    token: int
    deadline: float
    claim: float
    took_over: bool


class ServerClock:
    """The server's clock read against ours (wall clocks), from the replies that queue a
    waiter: hand-offs are dated by the server's time of the hand-off, not by when its message
    arrived."""

    __slots__ = ("error", "offset")

    def __init__(self) -> None:
        self.offset = 0.0  # server clock - ours, in s
        self.error = math.inf  # its uncertainty: half a round trip

    def read(self, server_us: int, sent_at: float, received: float) -> None:
        self.offset = server_us / 1e6 - (sent_at + received) / 2
        self.error = (received - sent_at) / 2

    def handed(self, payload: list[str]) -> Handed | None:
        """The grant in a hand-off's fields (token, server µs, claim ms, took over), or None
        when it cannot be dated safely (no reading yet: the waiter asks the server)."""
        try:
            token, at_us, claim_ms, took = (int(field) for field in payload)
        except ValueError:
            return None
        if self.error >= 0.5:
            return None
        wall, now = time.time(), time.monotonic()
        expiry = at_us / 1e6 - self.offset + claim_ms / 1000 - self.error - 0.001
        return Handed(token, now + (expiry - wall), claim_ms / 1000, took == 1)


class Waiting:
    """Owner id -> its waiting acquire; the listener starts when the first of them is put in
    line (an acquire granted at once never needs it: a process that never waits holds no
    LISTEN session)."""

    def __init__(self, conninfo: str, connect_kwargs: dict[str, object], channel: str) -> None:
        self.conninfo, self.connect_kwargs, self.channel = conninfo, connect_kwargs, channel
        self._mutex = threading.Lock()
        self._flows: dict[bytes, PostgresFlow] = {}
        self._listener: Listener | None = None
        self._closed = False
        self.clock = ServerClock()

    def add(self, flow: PostgresFlow) -> None:
        with self._mutex:
            if not self._closed:
                self._flows[flow.owner] = flow

    def listen(self) -> None:
        """An acquire was put in line: make sure the listener runs (once LISTENing, it wakes
        every waiter to try again, so a hand-off made before that is not missed)."""
        if self._listener is None:
            with self._mutex:
                if self._listener is None and not self._closed:
                    from ._background import Listener

                    self._listener = Listener(self)

    def forget(self, flow: PostgresFlow) -> bool:
        """*flow* ended; False if the backend's close took it out of line first (its grant,
        if any, is being passed on: it must not be adopted)."""
        with self._mutex:
            if self._flows.get(flow.owner) is flow:
                del self._flows[flow.owner]
            return not flow.closed

    def poll(self, poll: float) -> float:
        """The safety-net poll: *poll*, or short until the listener is LISTENing."""
        listener = self._listener
        return poll if listener is not None and listener.ready.is_set() else _STARTUP_POLL

    def woken(self, payload: str) -> None:
        """A release handed a key to a waiter: *payload* is its owner id in hex, then the grant
        (see ``_sql``); give the grant to the waiter, and wake it."""
        owner_hex, *fields = payload.split(" ")
        try:
            owner = bytes.fromhex(owner_hex)
        except ValueError:
            return
        with self._mutex:
            flow = self._flows.get(owner)
        if flow is not None:
            flow.handed = self.clock.handed(fields) if len(fields) == 4 else None
            flow.woken = True
            flow.waiter.wake()

    def wake_all(self) -> None:
        """The listener (re)connected: a hand-off may have been missed; every waiter tries."""
        with self._mutex:
            flows = list(self._flows.values())
        for flow in flows:
            flow.woken = True
            flow.waiter.wake()

    def close(self) -> list[PostgresFlow]:
        """The backend closes: deliver no grant from now on, stop the listener, and wake the
        acquires still waiting (their backend tells them it is closed). Returns them: the
        close takes those in line at the server out of it, so no release hands them a key
        that nothing would renew or release."""
        with self._mutex:
            self._closed = True
            flows = list(self._flows.values())
            self._flows.clear()
            for flow in flows:
                flow.closed = True
        if self._listener is not None:
            self._listener.stop()
        for flow in flows:
            flow.woken = True
            flow.waiter.wake()
        return flows
