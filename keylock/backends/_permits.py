"""In-process permits: at most ``limit`` weight of live leases per key, served FIFO across
weights, with one token counter (semaphores and RW locks of :class:`MemoryBackend`, and the
in-process tier of every other backend's permits).

A :class:`MemoryPermits` view is a :class:`~keylock.backends.base.Backend` of one shape over
its parent's :class:`~keylock.backends._permittable.PermitTable` (one per parent, every
shape's keys: an RW reader and writer share a key), so KeyedLock's holds, leases, observers
and the base drivers (LoopWaiter / ThreadWaiter) work on it unchanged.
"""

from __future__ import annotations

import math
import os
import threading
from typing import TYPE_CHECKING

from ._permittable import PermitTable, _lost, _new_key, check_shape, limit_mismatch
from .base import Backend, Grant, KeyStatistics, Permits, Waiter

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from .._clock import Clock

__all__ = ["MemoryPermits", "PermitTable", "check_shape", "limit_mismatch", "permit_view"]


class MemoryPermits(Backend):
    """Permits of one shape ``(limit, weight)`` over a :class:`PermitTable`: the sum of the
    weights of live permits on a key never exceeds ``limit``; waiters are served FIFO across
    weights (one that does not fit blocks those behind it); a try is granted only when nobody
    waits and it fits; tokens strictly increase per key across weights; a key in use with
    another limit raises :class:`~keylock.LimitMismatch`; an expired permit's room goes to the
    next caller, whose grant says ``took_over``. A block that holds a permit of a key and would
    have to wait for another of it gets RuntimeError (it could wait for itself forever)."""

    needs_owner = False  # the token proves ownership in-process
    shape: Permits

    def __init__(self, table: PermitTable, shape: Permits, default_ttl: float | None) -> None:
        self.table = table
        self.shape = shape
        self.clock = table.clock  # (Backend._live dates grants with it)
        self.default_ttl = default_ttl
        cls = type(self)
        if (
            cls._try_acquire is MemoryPermits._try_acquire
            and cls.release_sync is MemoryPermits.release_sync
        ):  # (a subclass's own step stays in charge)
            self._try_acquire, self.release_sync = _fast_paths(table, shape)  # type: ignore[method-assign,assignment]

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


def _fast_paths(
    table: PermitTable, shape: Permits
) -> tuple[
    Callable[[str, bytes, float | None, Waiter | None, FrameType | None], Grant | None],
    Callable[[str, bytes, int], None],
]:
    """The uncontended acquire and release of one shape, as closures over the table (as
    MemoryBackend's: cells beat attribute loads, and a free key costs one list per grant)."""
    limit, weight = shape
    inf = math.inf
    lock = table.mutex.acquire
    unlock = table.mutex.release
    keys = table.keys
    get = keys.get
    tokens = table.tokens
    slow_step = table._step
    slow_release = table._release
    grant_new = table._grant

    # (literal indices below: constants beat global lookups on this path)
    def try_acquire(
        key: str,
        owner: bytes,
        ttl: float | None,
        waiter: Waiter | None,
        holder: FrameType | None = None,
    ) -> Grant | None:
        lock()
        try:
            entry = get(key)
            if entry is None:
                if ttl is None:
                    token = next(tokens)
                    permit = [token, None, None, False, owner, weight, holder]
                    keys[key] = [limit, weight, {token: permit}, None, 0, False, 0, inf]
                    return permit  # type: ignore[return-value]  # laid out as a Grant
                entry = keys[key] = _new_key(limit)
                return grant_new(entry, owner, ttl, weight, holder)
            return slow_step(key, entry, owner, ttl, waiter, holder, limit, weight)
        finally:
            unlock()

    def release(key: str, owner: bytes, token: int) -> None:
        lock()
        try:
            entry = get(key)
            if entry is not None and not entry[3] and not entry[4]:  # nobody waits, nothing owed
                holders = entry[2]
                permit = holders.get(token)
                if permit is not None and permit[2] is None and permit[4] == owner:
                    del holders[token]  # no TTL: cannot have expired
                    if holders:
                        entry[1] -= permit[5]
                    else:
                        del keys[key]
                    return
            expired = slow_release(key, owner, token)
        finally:
            unlock()
        if expired:
            raise _lost(key, token)

    return try_acquire, release


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
# a thread of the parent may have held it at fork time: that thread does not exist in the child
os.register_at_fork(after_in_child=_VIEWS_MUTEX._at_fork_reinit)  # type: ignore[attr-defined]
