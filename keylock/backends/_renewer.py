"""One daemon thread per backend keeping every auto-renewed lease alive (Redis, Postgres).

Leases wait in a heap by due time (a third of their TTL after their last renewal); each
wake-up renews every due lease in one batch (one pipelined round trip, one statement), so the
cost of a round does not grow with the number of leases. ``extend()`` reschedules a lease at a
third of its new TTL. The thread runs no user code: it calls only the lease's own hooks
(``_on_renewed``, ``_on_lost``), which return at once and deliver any callback (an observer,
``on_lost``) on the holder's event loop or keylock's callback thread, so a slow callback never
delays a renewal. Every failure is logged; none stops the thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import LeaseLost
from .base import Grant

if TYPE_CHECKING:
    from ..lease import Lease

__all__ = ["AutoRenewed", "Dated", "Renewal", "Renewer"]

logger = logging.getLogger("keylock")

#: Renew a batch of leases: (key, owner, ttl) each -> True (extended), False (not ours any
#: more), or an exception (this lease's renewal failed; an exception raised fails them all).
Renewal = Callable[[list[tuple[str, bytes, float]]], list[object]]
#: The lease's new dates after a renewal sent at (wall, monotonic) for *ttl*; LeaseLost if the
#: backend finds it lost after all (its in-process turn lapsed meanwhile).
Dated = Callable[["Lease", float, float, float], Grant]


def _dated(lease: Lease, ttl: float, sent_wall: float, sent: float) -> Grant:
    return Grant(lease.token, sent_wall + ttl, sent + ttl)


class _Entry:
    """A tracked lease: its TTL, its next renewal and until when it is surely ours."""

    __slots__ = ("due", "lease", "seq", "ttl", "valid_until")

    def __init__(self, lease: Lease, ttl: float, valid_until: float) -> None:
        self.lease = lease
        self.ttl = ttl
        self.valid_until = valid_until  # time.monotonic()
        self.due = 0.0
        self.seq = 0  # the heap item that is current (older ones are skipped)


class Renewer:
    """Renews tracked leases through *renew* (see :data:`Renewal`) on one thread named
    *name*; *dated* gives a renewed lease its new dates (see :data:`Dated`)."""

    def __init__(
        self,
        renew: Renewal,
        idle: float,
        *,
        name: str,
        dated: Dated = _dated,
        batch: int = 1000,
    ) -> None:
        self._renew = renew
        self._dated = dated
        self._cond = threading.Condition()
        self._entries: dict[Lease, _Entry] = {}  # guarded by _cond
        self._heap: list[tuple[float, int, Lease]] = []  # guarded by _cond; stale items skipped
        self._seq = itertools.count()
        self._wake_at = 0.0  # when the thread will look next (guarded by _cond)
        self._idle = idle  # the soonest a lease at the default TTL is due
        self._batch = batch
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- called by the backend

    def add(self, lease: Lease) -> None:
        """Look after *lease*: first renewal at a third of the time it has left (a lease
        handed over at a release starts with its short claim window)."""
        ttl = lease.ttl or 1.0
        left = ttl
        now = time.monotonic()
        if lease._deadline is not None:
            left = min(left, max(lease._deadline - now, 0.0))
        entry = _Entry(lease, ttl, now + left)
        with self._cond:
            self._entries[lease] = entry
            self._schedule(entry, now + left / 3)

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._entries.pop(lease, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    # ------------------------------------------------------------------------ the thread

    def _schedule(self, entry: _Entry, due: float) -> None:  # holding _cond
        entry.due = due
        entry.seq = next(self._seq)
        heapq.heappush(self._heap, (due, entry.seq, entry.lease))
        if due < self._wake_at:  # wake the thread only if it would sleep past this one
            self._cond.notify()

    def _take_due(self) -> list[_Entry] | None:
        """The entries due now (waiting until some are); None once stopped."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                due: list[_Entry] = []
                heap = self._heap
                while heap and len(due) < self._batch:
                    when, seq, lease = heap[0]
                    entry = self._entries.get(lease)
                    if entry is None or entry.seq != seq:
                        heapq.heappop(heap)  # released, or rescheduled since
                    elif when <= now:
                        heapq.heappop(heap)
                        due.append(entry)
                    else:
                        break
                if due:
                    self._wake_at = 0.0  # busy renewing: new leases are picked up next round
                    return due
                # idle: look again when a lease taken now at the default TTL would be due,
                # so taking one never has to wake this thread (a thread switch per acquire)
                self._wake_at = heap[0][0] if heap else now + self._idle
                self._cond.wait(max(self._wake_at - now, 0.001))
            return None

    def _run(self) -> None:
        while (due := self._take_due()) is not None:
            try:
                self._renew_due(due)
            except Exception:  # never fatal: the leases are looked at again soon
                logger.exception("keylock: renewing %d leases failed", len(due))
                with self._cond:
                    for entry in due:
                        if self._entries.get(entry.lease) is entry:
                            self._schedule(entry, time.monotonic() + min(entry.ttl / 10, 1.0))

    def _renew_due(self, due: list[_Entry]) -> None:
        sent, sent_wall = time.monotonic(), time.time()
        batch = [(entry.lease._full_key, entry.lease._owner, entry.ttl) for entry in due]
        try:
            results: list[object] = self._renew(batch)
        except Exception as exc:
            results = [exc] * len(due)
        now = time.monotonic()
        gone: list[Lease] = []
        with self._cond:
            for entry, result in zip(due, results, strict=True):
                if self._entries.get(entry.lease) is not entry:
                    continue  # released meanwhile
                if result is True:
                    try:
                        grant = self._dated(entry.lease, entry.ttl, sent_wall, sent)
                    except LeaseLost:
                        result = False
                    else:
                        entry.valid_until = sent + entry.ttl
                        self._schedule(entry, sent + entry.ttl / 3)
                        self._renewed(entry.lease, grant)
                        continue
                if isinstance(result, Exception) and now < entry.valid_until:
                    self._schedule(entry, now + min(entry.ttl / 10, 1.0))  # try again soon
                else:
                    if isinstance(result, Exception):
                        logger.warning(
                            "keylock: renewal of %r failed past its expiry: %s",
                            entry.lease.key,
                            result,
                        )
                    del self._entries[entry.lease]
                    gone.append(entry.lease)
        for lease in gone:
            self._lost(lease)

    # ------------------------------------------------------------- the lease's hooks, safely

    @staticmethod
    def _renewed(lease: Lease, grant: Grant) -> None:
        # the lease's own hook returns at once and hands any user code elsewhere
        _guarded(lambda: lease._on_renewed(grant))

    @staticmethod
    def _lost(lease: Lease) -> None:
        _guarded(lease._on_lost)


def _guarded(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:
        logger.exception("keylock: a lease callback raised (ignored)")


class AutoRenewed:
    """Mixin for a backend whose leases with a TTL one :class:`Renewer` keeps alive while
    ``auto_renew`` is on: started at the first such lease, stopped by :meth:`_stop_renewing`.
    A backend sets ``_renewer = None`` for each process (a forked child starts its own)."""

    auto_renew: bool
    _renewer: Renewer | None = None
    _renewer_mutex = threading.Lock()  # (making a renewer is rare: one lock for every backend)

    def _new_renewer(self) -> Renewer:
        """This backend's renewer (see :data:`Renewal`, :data:`Dated`)."""
        raise NotImplementedError

    def _track(self, lease: Lease) -> None:
        if self.auto_renew and lease.ttl:
            renewer = self._renewer
            if renewer is None:
                with AutoRenewed._renewer_mutex:
                    renewer = self._renewer
                    if renewer is None:
                        renewer = self._renewer = self._new_renewer()
            renewer.add(lease)

    def _untrack(self, lease: Lease) -> None:
        renewer = self._renewer
        if renewer is not None:
            renewer.remove(lease)

    def _stop_renewing(self) -> None:
        renewer = self._renewer
        if renewer is not None:
            renewer.stop()


# a child forked while another thread made a renewer must not inherit the lock held
os.register_at_fork(after_in_child=AutoRenewed._renewer_mutex._at_fork_reinit)  # type: ignore[attr-defined]
