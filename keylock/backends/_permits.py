"""In-process permits: at most ``limit`` weight of live leases per key, served FIFO across
weights, with one token counter (semaphores and RW locks of :class:`MemoryBackend`, and the
in-process tier of every other backend's permits).

One :class:`PermitTable` per parent backend holds every shape's keys (an RW reader and writer
share a key), under one ``threading.Lock``; a :class:`MemoryPermits` view is a
:class:`~keylock.backends.base.Backend` of one shape over it, so KeyedLock's holds, leases,
observers and the base drivers (LoopWaiter / ThreadWaiter) work on it unchanged.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import LeaseLost, LimitMismatch
from ._waiters import on_this_stack, reentry_error
from .base import RW_LIMIT, Backend, Grant, KeyStatistics, Permits, Waiter

if TYPE_CHECKING:
    from types import FrameType

    from .._clock import Clock

__all__ = ["MemoryPermits", "PermitTable", "check_shape", "limit_mismatch", "permit_view"]

# A live permit, also returned as its grant (index 0 to 3 match Grant):
# [token, expires_at, deadline, took_over, owner, weight, holder frame]
_Permit: TypeAlias = list[Any]
MAX_LAPSED = 10_000  # keys kept only to tell a next holder it took over (beyond: forgotten)


class _Key:
    """One permit key: its limit, the weight held, its holders and its FIFO line."""

    __slots__ = ("holders", "lapsed", "limit", "owed", "used", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # recorded while anyone holds or waits
        self.used = 0  # the weight of the permits in holders
        self.holders: dict[int, _Permit] = {}  # token -> permit, oldest first
        self.waiters: OrderedDict[Waiter, int] = OrderedDict()  # waiter -> weight, FIFO
        self.owed = 0  # expired permits whose room was not granted again: next grants took over
        self.lapsed = False  # kept only for owed (no holder, no waiter): counted in lapsed


def check_shape(limit: object, weight: object, backend: str) -> Permits:
    """The shape ``(limit, weight)`` if it is one (positive ints, weight <= limit)."""
    for name, value in (("limit", limit), ("weight", weight)):
        if type(value) is not int or value < 1:  # (bool is not an int here)
            raise ValueError(
                f"{backend}.permits(): {name} must be a positive int, not {value!r}: "
                "e.g. KeyedSemaphore(limit=4)"
            )
    if weight > limit:  # type: ignore[operator]
        raise ValueError(f"{backend}.permits(): weight {weight} exceeds limit {limit}")
    return Permits(limit, weight)  # type: ignore[arg-type]


def _shown(limit: int) -> str:
    return "an RW lock" if limit == RW_LIMIT else f"a semaphore of limit {limit}"


def limit_mismatch(key: str, held: int, asked: int) -> LimitMismatch:
    """The error for a request whose limit differs from the one *key* is in use with."""
    return LimitMismatch(
        f"{key!r} is in use as {_shown(held)}, and this request asks for it as {_shown(asked)}: "
        "nothing was granted; every client of one key must pass the same limit (or use "
        "another key or namespace)",
        key=key,
    )


def _lost(key: str, token: int) -> LeaseLost:
    return LeaseLost(
        f"permit {token} on {key!r} was lost (its TTL ran out or it was already released): "
        "the critical section was not protected; reconcile before acting on its results",
        key=key,
    )


class PermitTable:
    """Every permit key of one parent backend; all methods take the shape they act for."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.mutex = threading.Lock()  # guards keys and every _Key
        self.keys: dict[str, _Key] = {}
        self.lapsed = 0  # keys with no holder and no waiter, kept for their owed took_over
        # one counter for every key: strictly increasing per key, across weights
        self.tokens = itertools.count(time.time_ns() // 1000)
        _TABLES.add(self)

    def __len__(self) -> int:
        """How many keys have a holder or a waiter (for leak checks)."""
        with self.mutex:
            return sum(1 for k in self.keys.values() if k.holders or k.waiters)

    # ---------------------------------------------------------------------------- the step

    def step(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None,
        limit: int,
        weight: int,
    ) -> Grant | None:
        """Grant a permit now, or queue *waiter* (idempotently) and return None."""
        with self.mutex:
            entry = self.keys.get(key)
            if entry is None:
                entry = self.keys[key] = _Key(limit)
                return self._grant(entry, owner, ttl, weight, holder)
            return self._step(key, entry, owner, ttl, waiter, holder, limit, weight)

    def _step(
        self,
        key: str,
        entry: _Key,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None,
        limit: int,
        weight: int,
    ) -> Grant | None:
        """The step on a key with a record. Caller holds mutex."""
        if waiter is not None:
            if waiter.grant is not None:  # handed a permit since its last look
                return waiter.grant
            holder = waiter.holder
        if entry.limit != limit:
            self._purge(entry)
            if waiter is not None and waiter.grant is not None:
                return waiter.grant
            if entry.holders or entry.waiters:
                raise limit_mismatch(key, entry.limit, limit)
            self._revive(entry, limit)
        waiters = entry.waiters
        if not waiters and entry.used + weight <= limit:
            if entry.lapsed:
                self._revive(entry, limit)
            return self._grant(entry, owner, ttl, weight, holder)
        self._purge(entry)  # expired holders make room (and serve the line first)
        if waiter is not None and waiter.grant is not None:
            return waiter.grant
        first = next(iter(waiters), None)
        if (first is None or first is waiter) and entry.used + weight <= limit:
            if first is not None:
                del waiters[first]
            return self._grant(entry, owner, ttl, weight, holder)
        if waiter is None:
            return None  # a try never queues (and may probe a key its own block holds)
        for permit in entry.holders.values():
            frame = permit[6]
            if frame is not None and on_this_stack(frame):
                raise reentry_error(key)  # (its own permit would have to be released first)
        if waiter not in waiters:
            waiters[waiter] = weight
        waiter.retry_at = _earliest(entry)
        return None

    def _revive(self, entry: _Key, limit: int) -> None:
        """A key with no holder and no waiter is in use again, with *limit*."""
        if entry.lapsed:
            entry.lapsed = False
            self.lapsed -= 1
        entry.limit = limit

    def _grant(
        self,
        entry: _Key,
        owner: bytes,
        ttl: float | None,
        weight: int,
        holder: FrameType | None,
    ) -> Grant:
        """Record a new permit of *weight* (its token minted now). Caller holds mutex."""
        token = next(self.tokens)
        owed = entry.owed
        took_over = owed > 0
        if took_over:
            entry.owed = owed - min(owed, weight)  # a writer takes over every lapsed permit
        entry.used += weight
        permit: _Permit
        if ttl is None:
            permit = [token, None, None, took_over, owner, weight, holder]
        else:
            clock = self.clock
            wall = clock.time()  # first: a switch between the reads only makes it early
            permit = [token, wall + ttl, clock.monotonic() + ttl, took_over, owner, weight, holder]
        entry.holders[token] = permit
        return permit  # type: ignore[return-value]  # laid out as a Grant

    def _purge(self, entry: _Key) -> None:
        """Drop holders whose TTL ran out (the next grants took over), then serve the line;
        the caller's step uses the key next (it is not freed here). Caller holds mutex."""
        now = self.clock.monotonic()
        for token, permit in list(entry.holders.items()):
            deadline = permit[2]
            if deadline is not None and now >= deadline:
                del entry.holders[token]
                entry.used -= permit[5]
                entry.owed += 1
        self._serve(None, entry)

    def _serve(self, key: str | None, entry: _Key) -> None:
        """Hand permits to the oldest waiters while they fit (FIFO: one that does not fit
        blocks the later ones), arm the head for the next expiry, free an idle *key*."""
        waiters = entry.waiters
        while waiters:
            waiter, weight = next(iter(waiters.items()))
            if entry.used + weight > entry.limit:
                head_retry = _earliest(entry)
                if waiter.retry_at > head_retry:
                    waiter.retry_at = head_retry
                    waiter.wake()  # it may sleep with no retry time: let it re-read this one
                return
            del waiters[waiter]
            owed = entry.owed
            permit = self._grant(entry, waiter.owner, waiter.ttl, weight, waiter.holder)
            waiter.grant = permit
            if not waiter.wake():  # its event loop is closed: nobody would release it
                waiter.grant = None
                del entry.holders[permit[0]]
                entry.used -= weight
                entry.owed = owed
        if key is not None and not entry.holders and not entry.waiters:
            self._idle(key, entry)

    def _idle(self, key: str, entry: _Key) -> None:
        """*entry* has no holder and no waiter: forget it (and its limit), or keep a lapsed
        record that tells the next holder it took over. Caller holds mutex."""
        if entry.owed == 0:
            if entry.lapsed:
                self.lapsed -= 1
            del self.keys[key]
            return
        if not entry.lapsed:
            if self.lapsed >= MAX_LAPSED:  # keys nobody came back for: forget them
                for name in [k for k, e in self.keys.items() if e.lapsed]:
                    del self.keys[name]
                self.lapsed = 0
                self.keys[key] = entry
            entry.lapsed = True
            self.lapsed += 1

    # --------------------------------------------------------------------- leaving the line

    def withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        """Take *waiter* out of the line; the grant already handed to it, if any."""
        with self.mutex:
            if waiter.grant is not None:
                return waiter.grant
            entry = self.keys.get(key)
            if entry is not None and waiter in entry.waiters:
                del entry.waiters[waiter]
                self._serve(key, entry)  # the ones behind it may fit now
            return None

    # ------------------------------------------------------------------ release and extend

    def release(self, key: str, owner: bytes, token: int) -> None:
        """End permit *token*; LeaseLost if it was no longer live."""
        with self.mutex:
            entry = self.keys.get(key)
            permit = None if entry is None else entry.holders.get(token)
            if permit is None or permit[4] != owner:
                raise _lost(key, token)
            deadline = permit[2]
            expired = deadline is not None and self.clock.monotonic() >= deadline
            self._end(key, entry, permit, expired)  # type: ignore[arg-type]
        if expired:
            raise _lost(key, token)

    def _end(self, key: str, entry: _Key, permit: _Permit, took_over: bool) -> None:
        del entry.holders[permit[0]]
        entry.used -= permit[5]
        if took_over:
            entry.owed += 1
        self._serve(key, entry)

    def discard(self, key: str, owner: bytes, grant: Grant) -> None:
        """Give back a grant nobody will use; the next holder inherits its took_over."""
        with self.mutex:
            entry = self.keys.get(key)
            permit = None if entry is None else entry.holders.get(grant[0])
            if permit is None or permit[4] != owner:
                return
            deadline = permit[2]
            expired = deadline is not None and self.clock.monotonic() >= deadline
            self._end(key, entry, permit, expired or permit[3])  # type: ignore[arg-type]

    def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        """Make permit *token* lapse *ttl* seconds from now; LeaseLost if it is not live."""
        with self.mutex:
            entry = self.keys.get(key)
            permit = None if entry is None else entry.holders.get(token)
            clock = self.clock
            wall = clock.time()
            now = clock.monotonic()
            if permit is None or permit[4] != owner:
                raise _lost(key, token)
            deadline = permit[2]
            if deadline is not None and now >= deadline:
                raise _lost(key, token)
            permit[2] = deadline = now + ttl
            permit[1] = expires_at = wall + ttl
            return Grant(token, expires_at, deadline, permit[3])

    def statistics(self, key: str) -> KeyStatistics:
        """Live permits on *key*: held, the newest holder's token and owner, the line."""
        with self.mutex:
            entry = self.keys.get(key)
            if entry is None:
                return KeyStatistics(key, held=False, token=None, owner=None, waiting=0)
            now = self.clock.monotonic()
            live = [p for p in entry.holders.values() if p[2] is None or now < p[2]]
            newest = max(live, key=lambda p: p[0]) if live else None
            return KeyStatistics(
                key,
                held=newest is not None,
                token=None if newest is None else newest[0],
                owner=None if newest is None else newest[4] or None,
                waiting=len(entry.waiters),
                holders=len(live),
            )

    def reset(self) -> None:
        """Forget everything (a forked child: the parent's holders do not exist there)."""
        self.mutex._at_fork_reinit()  # type: ignore[attr-defined]  # (as threading does)
        self.keys.clear()
        self.lapsed = 0


def _earliest(entry: _Key) -> float:
    """When the first holder of *entry* lapses (math.inf: none has a TTL)."""
    deadlines = [p[2] for p in entry.holders.values() if p[2] is not None]
    return min(deadlines) if deadlines else math.inf


class MemoryPermits(Backend):
    """Permits of one shape ``(limit, weight)`` over a :class:`PermitTable`: the sum of the
    weights of live permits on a key never exceeds ``limit``; waiters are served FIFO across
    weights (one that does not fit blocks those behind it); a try is granted only when nobody
    waits and it fits; tokens strictly increase per key across weights; a key in use with
    another limit raises :class:`~keylock.LimitMismatch`; an expired permit's room goes to the
    next caller, whose grant says ``took_over``. A block that holds a permit of a key and would
    have to wait for another of it gets RuntimeError (it could wait for itself forever)."""

    needs_owner = False  # the token proves ownership in-process

    def __init__(self, table: PermitTable, shape: Permits, default_ttl: float | None) -> None:
        self.table = table
        self.shape = shape
        self.clock = table.clock  # (Backend._live dates grants with it)
        self.default_ttl = default_ttl
        if type(self)._try_acquire is not MemoryPermits._try_acquire:
            return  # a subclass's own step stays in charge
        limit, weight = shape
        step = table.step

        # a closure over the shape: one call less on the uncontended path
        def try_acquire(
            key: str,
            owner: bytes,
            ttl: float | None,
            waiter: Waiter | None,
            holder: FrameType | None = None,
        ) -> Grant | None:
            return step(key, owner, ttl, waiter, holder, limit, weight)

        self._try_acquire = try_acquire  # type: ignore[method-assign]
        if type(self).release_sync is MemoryPermits.release_sync:
            self.release_sync = table.release  # type: ignore[method-assign]

    def __repr__(self) -> str:
        limit, weight = self.shape
        return f"MemoryPermits(limit={limit}, weight={weight})"

    def __len__(self) -> int:
        """How many permit keys are held or awaited now (all shapes of the parent)."""
        return len(self.table)

    def _try_acquire(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None = None,
    ) -> Grant | None:
        limit, weight = self.shape  # (replaced per instance by a closure; see __init__)
        return self.table.step(key, owner, ttl, waiter, holder, limit, weight)

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        return self.table.withdraw(key, waiter)

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        self.table.release(key, owner, token)

    def _discard_sync(self, key: str, owner: bytes, grant: Grant) -> None:
        self.table.discard(key, owner, grant)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        return self.table.extend(key, owner, token, ttl)

    def statistics(self, key: str) -> KeyStatistics:
        return self.table.statistics(key)

    def permits(self, limit: int, weight: int = 1) -> Backend:
        raise TypeError(f"{self!r} is already a permit view: call permits() on its parent")


def permit_view(
    parent: Backend,
    limit: int,
    weight: int,
    clock: Clock,
    cls: type[MemoryPermits] = MemoryPermits,
) -> MemoryPermits:
    """*parent*'s view of shape ``(limit, weight)``: one per shape, all over one table."""
    shape = check_shape(limit, weight, type(parent).__name__)
    with _VIEWS_MUTEX:
        found: tuple[PermitTable, dict[Permits, MemoryPermits]] | None
        found = parent.__dict__.get("_permit_views")
        if found is None:
            found = (PermitTable(clock), {})
            parent.__dict__["_permit_views"] = found
        table, views = found
        view = views.get(shape)
        if view is None:
            view = views[shape] = cls(table, shape, parent.default_ttl)
        return view


_VIEWS_MUTEX = threading.Lock()  # (views are made rarely: one lock for every parent)

# Every permit table of this process, so a forked child can start each afresh.
_TABLES: weakref.WeakSet[PermitTable] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for table in list(_TABLES):
        table.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
