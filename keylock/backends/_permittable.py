"""The in-process permit table: at most ``limit`` weight of live leases per key, served FIFO
across weights, with one token counter for every key.

One :class:`PermitTable` per parent backend holds every shape's keys (an RW reader and writer
share a key), under one ``threading.Lock``; :mod:`keylock.backends._permits` makes the views.
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
from .base import RW_LIMIT, Grant, KeyStatistics, Permits, Waiter

if TYPE_CHECKING:
    from types import FrameType

    from .._clock import Clock

__all__ = ["PermitTable", "check_shape", "limit_mismatch"]

# A live permit, also returned as its grant (index 0 to 3 match Grant):
# [token, expires_at, deadline, took_over, owner, weight, holder frame]
_Permit: TypeAlias = list[Any]
MAX_LAPSED = 10_000  # keys kept only to tell a next holder it took over (beyond: forgotten)


# A permit key's record: [limit, used, holders, waiters, owed, lapsed, timed]: a list, as
# MemoryBackend's entries are (the uncontended path makes one per acquire)
_Key: TypeAlias = list[Any]
_LIMIT = 0  # recorded while anyone holds or waits
_USED = 1  # the weight of the permits in holders
_HOLDERS = 2  # dict: token -> permit, oldest first
_WAITERS = 3  # OrderedDict: waiter -> weight, FIFO; or None (made by the first waiter)
_OWED = 4  # expired permits whose room was not granted again: the next grants took over
_LAPSED = 5  # kept only for owed (no holder, no waiter): counted in PermitTable.lapsed
_TIMED = 6  # how many holders have a TTL (0: nothing can expire, no scan needed)


def _new_key(limit: int) -> _Key:
    return [limit, 0, {}, None, 0, False, 0]


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
            return sum(1 for k in self.keys.values() if k[_HOLDERS] or k[_WAITERS])

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
                entry = self.keys[key] = _new_key(limit)
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
        if entry[_LIMIT] != limit:
            self._purge(entry)
            if waiter is not None and waiter.grant is not None:
                return waiter.grant
            if entry[_HOLDERS] or entry[_WAITERS]:
                raise limit_mismatch(key, entry[_LIMIT], limit)
            self._revive(entry, limit)
        waiters = entry[_WAITERS]
        if not waiters and entry[_USED] + weight <= limit:
            if entry[_LAPSED]:
                self._revive(entry, limit)
            return self._grant(entry, owner, ttl, weight, holder)
        self._purge(entry)  # expired holders make room (and serve the line first)
        if waiter is not None and waiter.grant is not None:
            return waiter.grant
        first = next(iter(waiters), None) if waiters else None
        if (first is None or first is waiter) and entry[_USED] + weight <= limit:
            if first is not None:
                del waiters[first]
            return self._grant(entry, owner, ttl, weight, holder)
        if waiter is None:
            return None  # a try never queues (and may probe a key its own block holds)
        for permit in entry[_HOLDERS].values():
            frame = permit[6]
            if frame is not None and on_this_stack(frame):
                raise reentry_error(key)  # (its own permit would have to be released first)
        if waiters is None:
            waiters = entry[_WAITERS] = OrderedDict()
        if waiter not in waiters:
            waiters[waiter] = weight
        waiter.retry_at = _earliest(entry)
        return None

    def _revive(self, entry: _Key, limit: int) -> None:
        """A key with no holder and no waiter is in use again, with *limit*."""
        if entry[_LAPSED]:
            entry[_LAPSED] = False
            self.lapsed -= 1
        entry[_LIMIT] = limit

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
        owed = entry[_OWED]
        took_over = owed > 0
        if took_over:
            entry[_OWED] = owed - min(owed, weight)  # a writer takes over every lapsed permit
        entry[_USED] += weight
        permit: _Permit
        if ttl is None:
            permit = [token, None, None, took_over, owner, weight, holder]
        else:
            clock = self.clock
            wall = clock.time()  # first: a switch between the reads only makes it early
            permit = [token, wall + ttl, clock.monotonic() + ttl, took_over, owner, weight, holder]
            entry[_TIMED] += 1
        entry[_HOLDERS][token] = permit
        return permit  # type: ignore[return-value]  # laid out as a Grant

    def _purge(self, entry: _Key) -> None:
        """Drop holders whose TTL ran out (the next grants took over), then serve the line;
        the caller's step uses the key next (it is not freed here). Caller holds mutex."""
        if not entry[_TIMED]:
            return  # nothing can have expired (and the line was served at the last change)
        now = self.clock.monotonic()
        expired = False
        for token, permit in list(entry[_HOLDERS].items()):
            deadline = permit[2]
            if deadline is not None and now >= deadline:
                del entry[_HOLDERS][token]
                entry[_USED] -= permit[5]
                entry[_OWED] += 1
                entry[_TIMED] -= 1
                expired = True
        if expired:
            self._serve(None, entry)

    def _serve(self, key: str | None, entry: _Key) -> None:
        """Hand permits to the oldest waiters while they fit (FIFO: one that does not fit
        blocks the later ones), arm the head for the next expiry, free an idle *key*."""
        waiters = entry[_WAITERS]
        while waiters:
            waiter, weight = next(iter(waiters.items()))
            if entry[_USED] + weight > entry[_LIMIT]:
                head_retry = _earliest(entry)
                if waiter.retry_at > head_retry:
                    waiter.retry_at = head_retry
                    waiter.wake()  # it may sleep with no retry time: let it re-read this one
                return
            del waiters[waiter]
            owed = entry[_OWED]
            permit = self._grant(entry, waiter.owner, waiter.ttl, weight, waiter.holder)
            waiter.grant = permit
            if not waiter.wake():  # its event loop is closed: nobody would release it
                waiter.grant = None
                del entry[_HOLDERS][permit[0]]
                entry[_USED] -= weight
                entry[_OWED] = owed
                entry[_TIMED] -= permit[2] is not None
        if key is not None and not entry[_HOLDERS] and not entry[_WAITERS]:
            self._idle(key, entry)

    def _idle(self, key: str, entry: _Key) -> None:
        """*entry* has no holder and no waiter: forget it (and its limit), or keep a lapsed
        record that tells the next holder it took over. Caller holds mutex."""
        if entry[_OWED] == 0:
            if entry[_LAPSED]:
                self.lapsed -= 1
            del self.keys[key]
            return
        if not entry[_LAPSED]:
            if self.lapsed >= MAX_LAPSED:  # keys nobody came back for: forget them
                for name in [k for k, e in self.keys.items() if e[_LAPSED]]:
                    del self.keys[name]
                self.lapsed = 0
                self.keys[key] = entry
            entry[_LAPSED] = True
            self.lapsed += 1

    # --------------------------------------------------------------------- leaving the line

    def withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        """Take *waiter* out of the line; the grant already handed to it, if any."""
        with self.mutex:
            if waiter.grant is not None:
                return waiter.grant
            entry = self.keys.get(key)
            if entry is not None and entry[_WAITERS] and waiter in entry[_WAITERS]:
                del entry[_WAITERS][waiter]
                self._serve(key, entry)  # the ones behind it may fit now
            return None

    # ------------------------------------------------------------------ release and extend

    def release(self, key: str, owner: bytes, token: int) -> None:
        """End permit *token*; LeaseLost if it was no longer live."""
        with self.mutex:
            expired = self._release(key, owner, token)
        if expired:
            raise _lost(key, token)

    def _release(self, key: str, owner: bytes, token: int) -> bool:
        """End permit *token*: True if it had expired; LeaseLost if it was not there.
        Caller holds mutex."""
        entry = self.keys.get(key)
        permit = None if entry is None else entry[_HOLDERS].get(token)
        if permit is None or permit[4] != owner:
            raise _lost(key, token)
        deadline = permit[2]
        expired = deadline is not None and self.clock.monotonic() >= deadline
        self._end(key, entry, permit, expired)  # type: ignore[arg-type]
        return expired

    def _end(self, key: str, entry: _Key, permit: _Permit, took_over: bool) -> None:
        del entry[_HOLDERS][permit[0]]
        entry[_USED] -= permit[5]
        entry[_TIMED] -= permit[2] is not None
        if took_over:
            entry[_OWED] += 1
        self._serve(key, entry)

    def discard(self, key: str, owner: bytes, grant: Grant) -> None:
        """Give back a grant nobody will use; the next holder inherits its took_over."""
        with self.mutex:
            entry = self.keys.get(key)
            permit = None if entry is None else entry[_HOLDERS].get(grant[0])
            if permit is None or permit[4] != owner:
                return
            deadline = permit[2]
            expired = deadline is not None and self.clock.monotonic() >= deadline
            self._end(key, entry, permit, expired or permit[3])  # type: ignore[arg-type]

    def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        """Make permit *token* lapse *ttl* seconds from now; LeaseLost if it is not live."""
        with self.mutex:
            entry = self.keys.get(key)
            permit = None if entry is None else entry[_HOLDERS].get(token)
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
            live = [p for p in entry[_HOLDERS].values() if p[2] is None or now < p[2]]
            newest = max(live, key=lambda p: p[0]) if live else None
            return KeyStatistics(
                key,
                held=newest is not None,
                token=None if newest is None else newest[0],
                owner=None if newest is None else newest[4] or None,
                waiting=len(entry[_WAITERS] or ()),
                holders=len(live),
            )

    def reset(self) -> None:
        """Forget everything (a forked child: the parent's holders do not exist there)."""
        self.mutex._at_fork_reinit()  # type: ignore[attr-defined]  # (as threading does)
        self.keys.clear()
        self.lapsed = 0


def _earliest(entry: _Key) -> float:
    """When the first holder of *entry* lapses (math.inf: none has a TTL)."""
    if not entry[_TIMED]:
        return math.inf
    deadlines = [p[2] for p in entry[_HOLDERS].values() if p[2] is not None]
    return min(deadlines) if deadlines else math.inf


# Every permit table of this process, so a forked child can start each afresh.
_TABLES: weakref.WeakSet[PermitTable] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for table in list(_TABLES):
        table.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
