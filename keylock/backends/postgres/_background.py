"""The Postgres backend's two threads per process: one LISTENing connection that wakes the
waiter a release handed the key to, and one renewer that extends every due lease in one
statement per wake-up."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, cast

from ...errors import BackendUnavailable, LeaseLost
from ._sql import stored
from ._wire import listen_connection

if TYPE_CHECKING:
    from ...lease import Lease
    from ._waiting import Waiting
    from .backend import PostgresBackend

__all__ = ["Listener", "Renewer", "renew_all"]

logger = logging.getLogger("keylock")

_NOTIFY_WAIT = 0.1  # seconds between checks of the stop flag while listening
_RECONNECT_PAUSE = 0.2  # after a lost listening connection (waiters poll meanwhile)


class Listener:
    """One session connection per backend and process, in a daemon thread: a NOTIFY on this
    process's channel names the owner id (hex) a release handed a key to; its waiter is woken.
    While the connection is down, waiters fall back to their safety-net poll; on reconnect
    every waiter tries once (a hand-off may have been missed)."""

    def __init__(self, waiting: Waiting) -> None:
        self._waiting = weakref.ref(waiting)
        self._conninfo, self._kwargs = waiting.conninfo, waiting.connect_kwargs
        self.channel = waiting.channel
        self.ready = threading.Event()  # LISTEN is in place
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="keylock-postgres-listener", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = listen_connection(self._conninfo, self._kwargs, self.channel)
            except Exception as exc:
                logger.warning("keylock: Postgres listener cannot connect (%s); retrying", exc)
                self._stop.wait(_RECONNECT_PAUSE)
                continue
            try:
                self.ready.set()
                waiting = self._waiting()
                if waiting is None:
                    return
                waiting.wake_all()
                del waiting
                while not self._stop.is_set():
                    for notify in conn.notifies(timeout=_NOTIFY_WAIT):
                        waiting = self._waiting()
                        if waiting is None:
                            return
                        waiting.woken(notify.payload)
                        del waiting
            except Exception as exc:
                if not self._stop.is_set():
                    logger.warning("keylock: Postgres listener lost its connection (%s)", exc)
                    self._stop.wait(_RECONNECT_PAUSE)
            finally:
                self.ready.clear()
                try:
                    conn.close()
                except Exception:
                    pass

    def stop(self) -> None:
        """Stop listening; the thread closes its connection within _NOTIFY_WAIT."""
        self._stop.set()


class Renewer:
    """One daemon thread per backend renewing tracked leases, each at a third of its TTL; the
    leases due at one wake-up are renewed in one statement (a heap orders them by due time)."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = weakref.ref(backend)
        self._cond = threading.Condition()
        self._due: dict[Lease, float] = {}  # lease -> its next renewal (time.monotonic())
        self._heap: list[tuple[float, int, Lease]] = []  # stale entries are skipped on pop
        self._order = itertools.count()
        self._wake_at = 0.0  # when the thread will look next (guarded by _cond)
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name="keylock-postgres-renewer", daemon=True
        )
        self._thread.start()

    def add(self, lease: Lease, left: float | None = None) -> None:
        """Renew *lease* a third of the way to its expiry (or *left* seconds from now)."""
        if left is None:
            deadline = lease._deadline
            remaining = lease.ttl or 1.0
            if deadline is not None:
                remaining = min(remaining, max(deadline - time.monotonic(), 0.0))
            left = remaining / 3
        self._schedule(lease, time.monotonic() + left)

    def _schedule(self, lease: Lease, due: float) -> None:
        with self._cond:
            self._due[lease] = due
            heapq.heappush(self._heap, (due, next(self._order), lease))
            if due < self._wake_at:
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._due.pop(lease, None)

    def tracking(self, lease: Lease) -> bool:
        with self._cond:
            return lease in self._due

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _ready(self) -> list[Lease] | None:
        """The leases due now (waiting until some are); None once stopped."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                ready: list[Lease] = []
                heap = self._heap
                while heap and heap[0][0] <= now:
                    due, _, lease = heapq.heappop(heap)
                    if self._due.get(lease) == due:  # else: removed or rescheduled
                        ready.append(lease)
                if ready:
                    self._wake_at = 0.0  # busy: new leases are picked up next round
                    return ready
                self._wake_at = heap[0][0] if heap else now + 3600.0
                self._cond.wait(max(self._wake_at - now, 0.001))
            return None

    def _run(self) -> None:
        while (ready := self._ready()) is not None:
            backend = self._backend()
            if backend is None:
                return
            try:
                lost = renew_all(backend, ready)
            except BackendUnavailable as exc:
                now = time.monotonic()
                lost = []
                for lease in ready:
                    deadline = lease._deadline
                    if deadline is not None and now < deadline:  # still valid: retry soon
                        self.add(lease, min((lease.ttl or 1.0) / 10, 1.0))
                    else:
                        logger.warning("keylock: renewal of %r failed: %s", lease.key, exc)
                        lost.append(lease)
            else:
                for lease in ready:
                    if lease not in lost and self.tracking(lease):
                        self.add(lease, (lease.ttl or 1.0) / 3)
            del backend
            for lease in lost:
                with self._cond:
                    if self._due.pop(lease, None) is None:
                        continue  # released meanwhile: nothing to tell
                lease._on_lost()


def renew_all(backend: PostgresBackend, leases: list[Lease]) -> list[Lease]:
    """Renew *leases* in one statement (from the renewer thread); return the lost ones."""
    ttls = [lease.ttl or backend._ttl for lease in leases]
    sent = (time.time(), time.monotonic())
    rows = backend._run_sync(
        leases[0]._full_key,
        backend._schema.renew,
        [
            [stored(lease._full_key) for lease in leases],
            [lease._owner for lease in leases],
            [max(int(ttl * 1000), 1) for ttl in ttls],
        ],
    )
    renewed = {bytes(cast("bytes", row[0])) for row in rows}
    lost = []
    tier = backend._tier
    for lease, ttl in zip(leases, ttls, strict=True):
        if lease._owner not in renewed:
            lost.append(lease)
            continue
        with tier.mutex:
            held = tier.held.get(lease._full_key)
        if held is None or held.owner != lease._owner:
            continue  # released meanwhile
        try:
            lease._on_renewed(backend._extended(lease._full_key, held, ttl, sent))
        except LeaseLost:
            lost.append(lease)
    return lost
