"""Semaphores and RW locks on Postgres: :meth:`PostgresBackend.permits` views.

A view is the parent backend seen through permits of one shape ``(limit, weight)``: the same
two tiers as its locks (in front, this process's memory permit table of that shape, shared by
every shape of the parent; behind it, the permit statements of ``_permit_sql``), the same
connections, listener (one LISTEN session per waiting process serves locks and permits: a
hand-off names its waiter's owner id) and renewer (one statement renews every due lease,
locks and permits). Every guarantee of a permit key is the server's, one statement per
decision: capacity, FIFO across weights, one token counter per key floored at the server's
clock, the limit check, a dead holder's permit lapsing at its TTL.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from .._permits import limit_mismatch
from .._tiered import Held
from .._tieredpermits import TieredPermits, tiered_view
from ..base import Grant, KeyStatistics, register_permits
from ._flow import PostgresFlow
from ._permit_sql import PermitSchema, permit_schema_for
from ._sql import stored
from .backend import PostgresBackend

if TYPE_CHECKING:
    from collections.abc import Hashable

    from ...lease import Lease
    from .._tiered import Flow
    from .._waiters import Waiter
    from ..base import Deadline
    from ._waiting import ServerClock

__all__ = ["PostgresPermits", "permit_view"]

MISMATCH = -1  # the acquire's status when the key is in use with another limit


class PermitFlow(PostgresFlow):
    """A lock's flow (tries, hand-offs, the safety-net poll), plus the limit check: a key in
    use with another limit raises :class:`~keylock.LimitMismatch`, nothing granted."""

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
        limit: int,
    ) -> None:
        super().__init__(key, owner, ttl, deadline, waiter, local, poll, clock)
        self.limit = limit

    def on_reply(self, reply: object, now: float) -> None:
        status, recorded = cast("tuple[int, int]", reply)[:2]
        if status == MISMATCH:
            raise limit_mismatch(self.key, int(recorded), self.limit)
        super().on_reply(reply, now)


class PostgresPermits(TieredPermits, PostgresBackend):
    """Permits of one shape on a :class:`PostgresBackend` (see the module's docstring): made
    by ``backend.permits(limit, weight)``, it lives and dies with its parent."""

    _permit_sql: PermitSchema  # set by permit_view

    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        parent = self._parent
        assert isinstance(parent, PostgresBackend)
        flow = PermitFlow(
            key,
            owner,
            ttl or parent._ttl,
            deadline,
            waiter,
            local,
            parent.poll,
            parent._waiting.clock,
            self.shape.limit,
        )
        flow.leave_sql = self._permit_sql.leave
        if deadline.timeout != 0:
            parent._waiting.add(flow)
        return flow

    def _trip_params(self, flow: Flow, trip: Hashable) -> list[object]:
        limit, weight = self.shape
        key, owner, ttl_ms, queue, stay_ms, claim_ms, channel = self._acquire_params(flow, trip)
        return [key, owner, limit, weight, ttl_ms, queue, stay_ms, claim_ms, channel]

    def _statements(self) -> PermitSchema:
        return self._permit_sql

    def _adopt(self, flow: Flow) -> Grant:
        """The server granted a permit: this process's turn lasts as long as the permit."""
        self._forget(flow)
        grant = flow.grant
        assert grant is not None
        assert grant[2] is not None
        deadline = grant[2]
        now = time.monotonic()
        tier = self._tier
        tier.local.extend_sync(flow.key, flow.owner, flow.local[0], max(deadline - now, 1e-6))
        with tier.mutex:
            tier.held[(flow.key, grant[0])] = Held(grant[0], flow.owner, flow.local[0])
        return Grant(grant[0], time.time() + (deadline - now), deadline, grant[3])

    def _release_params(self, key: str, held: Held) -> list[object]:
        return [stored(key), held.owner, held.token]

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        """The server's view of *key* (every client's permits and waiters in line), plus the
        callers of this process still waiting in its own line: one round trip."""
        row = self._run_sync(key, self._permit_sql.statistics, [stored(key)])[0]
        _, owner, token, holders, _, waiting = cast(
            "tuple[int | None, bytes | None, int | None, int, int, int]", row
        )
        waiting = int(waiting) + local.waiting
        if not holders:
            return KeyStatistics(key, False, None, None, waiting)
        shown = bytes(owner) if owner is not None else None
        return KeyStatistics(key, True, token, shown, waiting, int(holders))

    # ---------------------------------------------------- auto-renew: the parent's renewer

    def _track(self, lease: Lease) -> None:
        self._parent._track(lease)

    def _untrack(self, lease: Lease) -> None:
        self._parent._untrack(lease)

    def _renewed(self, lease: Lease, ttl: float, sent_wall: float, sent: float) -> Grant:
        """A renewal of permit *lease* landed (called by the parent's renewer): move this
        process's turn too (LeaseLost if it was released meanwhile)."""
        tier = self._tier
        with tier.mutex:
            held = tier.held.get((lease._full_key, lease.token))
        if held is None or held.owner != lease._owner:
            raise self._lost(lease.key, lease.token)
        return self._extended(lease._full_key, held, ttl, (sent_wall, sent))


def permit_view(parent: PostgresBackend, limit: int, weight: int) -> PostgresPermits:
    """Semaphores and RW locks on *parent*'s server: its view of shape ``(limit, weight)``
    (cached per shape)."""
    view = tiered_view(parent, PostgresPermits, limit, weight)
    if "_permit_sql" not in view.__dict__:
        view.__dict__["_permit_sql"] = permit_schema_for(
            parent._schema.table, durable=parent._durable
        )
        # from now on every renewal also covers this backend's permits (one statement)
        parent._permit_renew = view._permit_sql.renew
    return view


register_permits(PostgresBackend, permit_view)
