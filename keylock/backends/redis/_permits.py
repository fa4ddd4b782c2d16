"""Semaphores and RW locks on Redis: a :class:`RedisBackend`'s permit views.

A view of shape ``(limit, weight)`` is the lock path with the permit scripts in its place
(:mod:`._permit_scripts`): the same sans-IO acquire flow (only its scripts, keys and the
limit-mismatch reply differ), the same listener (a hand-off is the lock path's message, one
per waiter, so every waiter of one process that is handed a permit wakes), the parent's one
renewer (its renewal extends permits with PERMIT_EXTEND, locks with EXTEND), and in front the
memory permit table of the shape (see ``.._tieredpermits``). With the parent's ``replicas=N``
a permit is replicated as a lease is (:mod:`._replicas`): its grant and its extends are
followed by WAIT, and a waiter handed a permit confirms it with its own acquire and WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, cast

from ...errors import BackendUnavailable, KeylockError, LeaseLost
from .._permits import limit_mismatch
from .._tieredpermits import TieredPermits, tiered_view
from ..base import Deadline, KeyStatistics, Permits, described, register_permits
from ._flow import AcquireFlow, RedisFlow, Trip, ttl_ms
from ._keys import Layout
from ._permit_scripts import (
    MISMATCH,
    PERMIT_ACQUIRE,
    PERMIT_EXTEND,
    PERMIT_LEAVE,
    PERMIT_RELEASE,
    PERMIT_STATS,
)
from ._scripts import RELEASE_MARK_MS
from ._wire import FAILURES, unavailable
from .backend import RedisBackend

if TYPE_CHECKING:
    from ...lease import Lease
    from .._tiered import Flow, Held, PermitTier
    from .._waiters import Waiter
    from ..base import Grant
    from ._flow import ServerClock
    from ._listener import Waiting
    from ._wire import Arg

__all__ = ["PermitFlow", "PermitProtocol", "RedisPermits", "permit_view", "reword"]

# What a RedisBackend sets once and for all in its constructor: a view keeps its own reference
# to each (the uncontended path then never goes through TieredPermits.__getattr__). What a
# forked child sets again (_start_process: the tier, listener, clock, channel) is read from the
# parent each time.
_STABLE = (
    "layout",
    "prefix",
    "_connections",
    "_where",
    "poll",
    "_stay_ms",
    "_ttl",
    "replication",
    "replicas",
)


class _PermitKeys(Layout):
    """The layout AcquireFlow is given for a permit: its "acquire keys" are a permit key's."""

    __slots__ = ()

    def acquire(self, key: str, owner: bytes) -> list[str]:
        return self.permit(key, owner)


def permit_view(parent: RedisBackend, limit: int, weight: int) -> RedisPermits:
    """Semaphores and RW locks on *parent*'s Redis: its view of shape ``(limit, weight)``
    (cached per shape on the parent), sharing its connections and threads."""
    view = tiered_view(parent, RedisPermits, limit, weight)
    found = view.__dict__
    if "_keys" not in found:  # (two threads may both fill it in: with the same values)
        for name in _STABLE:
            found[name] = getattr(parent, name)
        found["_keys"] = _PermitKeys(parent.prefix)
    return view


def reword(error: BaseException, key: str, where: str, shape: Permits) -> None:
    """Name *key* in *error* as the semaphore or RW lock of *shape* it is, if *error* is the
    wire's BackendUnavailable for *key*. The wire is shared with the parent's locks and names
    every key a lock: told the shape here, once a call failed, it costs no call anything.
    Reworded in place, so the traceback and the chain to the Redis error stay as raised."""
    cause = error.__cause__
    if (
        isinstance(error, BackendUnavailable)
        and isinstance(cause, FAILURES)
        and str(error) == str(unavailable(key, where, cause))
    ):
        error.args = unavailable(key, where, cause, shape).args


class PermitProtocol(AcquireFlow):
    """One permit acquire's protocol state: :class:`AcquireFlow` on PERMIT_ACQUIRE, whose
    ``{-1, limit}`` reply raises LimitMismatch (nothing was granted or queued)."""

    __slots__ = ("limit", "refused", "weight")

    script = PERMIT_ACQUIRE

    def __init__(
        self,
        layout: Layout,
        key: str,
        owner: bytes,
        *,
        limit: int,
        weight: int,
        ttl: float,
        timeout: float | None,
        now: float,
        channel: str,
        stay_ms: int,
        poll: float,
        renewed: bool,
        confirm: bool,
    ) -> None:
        # (every argument by name, not **kwargs: this runs once per acquire)
        AcquireFlow.__init__(
            self,
            layout,
            key,
            owner,
            ttl=ttl,
            timeout=timeout,
            now=now,
            channel=channel,
            stay_ms=stay_ms,
            poll=poll,
            renewed=renewed,
            confirm=confirm,
        )
        self.limit = limit
        self.weight = weight
        self.refused = False
        self.args += (limit, weight, key)

    def on_reply(
        self,
        reply: object,
        sent_at: float,
        received: float,
        now: float,
        clock: ServerClock,
        subscribed: bool,
    ) -> bool:
        first, value, *_ = cast("list[int | bytes]", reply)
        if int(first) == MISMATCH:
            self.in_flight = False
            self.answered = self.refused = True
            raise limit_mismatch(self.key, int(value), self.limit)
        return super().on_reply(reply, sent_at, received, now, clock, subscribed)

    def expired(self, now: float) -> KeylockError:
        return Deadline(self.key, self.timeout, now, Permits(self.limit, self.weight)).expired()

    def described(self) -> str:
        return described(self.key, Permits(self.limit, self.weight))

    def leave_args(self) -> list[Arg] | None:
        return None if self.refused else super().leave_args()


class PermitFlow(RedisFlow):
    """The tiered core's view of a :class:`PermitProtocol` (leaving with PERMIT_LEAVE)."""

    def on_error(self, error: Exception, now: float) -> Exception:
        protocol = cast("PermitProtocol", self.protocol)
        reword(error, self.key, self._where, Permits(protocol.limit, protocol.weight))
        return super().on_error(error, now)

    def leaving(self) -> object | None:
        trip = super().leaving()
        return trip._replace(script=PERMIT_LEAVE) if isinstance(trip, Trip) else trip


class RedisPermits(TieredPermits, RedisBackend):
    """Permits of one shape ``(limit, weight)`` on a :class:`RedisBackend`'s Redis: the weight
    of live permits on a key never exceeds ``limit``, across every process and host; waiters
    are served FIFO across weights (a waiting writer blocks the readers that come after it) and
    handed their permits by pub/sub, without polling; tokens strictly increase per key across
    weights (floored at the server clock); a permit whose holder stops renewing lapses at its
    TTL and the next grant says ``took_over``; a key in use with another limit raises
    :class:`~keylock.LimitMismatch`. With the parent's ``replicas=N``, a permit is handed to
    its caller only once N replicas acknowledged its grant (a hand-off: its confirmation), and
    an extend counts only once they acknowledged it, as for locks. Made by
    :meth:`RedisBackend.permits`; closing it does nothing (the parent owns the connections and
    threads)."""

    _parent: RedisBackend
    _keys: _PermitKeys

    # The parent's per-process state (set again in a forked child), read on every acquire:
    # properties, not TieredPermits.__getattr__ (a failed lookup first, then a call).

    @property
    def _waiting(self) -> Waiting:  # type: ignore[override]
        return self._parent._waiting

    @property
    def server_clock(self) -> ServerClock:  # type: ignore[override]
        return self._parent.server_clock

    @property
    def _tier(self) -> PermitTier:  # type: ignore[override]
        # the parent's tier is replaced in a forked child: the permit tier follows it
        tier = self._parent._tier
        cached = self.__dict__.get("_tier_of")
        if cached is None or cached[0] is not tier:
            cached = self.__dict__["_tier_of"] = (tier, tier.permits(*self.shape))
        return cached[1]

    # ------------------------------------------------------------------- the arbiter's part

    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        return PermitFlow(self, key, owner, ttl, deadline, waiter, local)

    def _protocol(
        self,
        key: str,
        owner: bytes,
        timeout: float | None,
        ttl: float | None,
        now: float | None = None,
    ) -> AcquireFlow:
        parent = self._parent
        limit, weight = self.shape
        return PermitProtocol(
            self._keys,
            key,
            owner,
            limit=limit,
            weight=weight,
            ttl=parent._ttl if ttl is None else ttl,
            timeout=timeout,
            now=time.monotonic() if now is None else now,
            channel=parent._channel,
            stay_ms=parent._stay_ms,
            poll=parent.poll,
            renewed=parent.auto_renew,
            confirm=parent.replicas > 0,  # a hand-off counts once the replicas have it
        )

    def _adopt(self, flow: Flow) -> Grant:
        grant = TieredPermits._adopt(self, flow)
        # before the lease is tracked: the parent's renewal extends it as a permit
        self._parent._permit_owners.add(flow.owner)
        if not self._parent.auto_renew and grant[2] is not None:
            # nobody renews: the in-process permit lapses with the one on Redis
            left = max(grant[2] - time.monotonic(), 0.001)
            with contextlib.suppress(LeaseLost):
                self._tier.local.extend_sync(flow.key, flow.owner, flow.local[0], left)
        return grant

    def _release_call(self, key: str, held: Held) -> tuple[list[str], list[Arg]]:
        self._parent._permit_owners.discard(held.owner)
        return self._parent.layout.permit(key, held.owner), [held.owner, key, RELEASE_MARK_MS]

    def _end_sync(self, key: str, held: Held) -> bool:
        keys, args = self._release_call(key, held)
        try:
            return bool(self._parent._run_sync(PERMIT_RELEASE, key, keys, args))
        except BackendUnavailable as error:
            reword(error, key, self._where, self.shape)
            raise

    async def _end(self, key: str, held: Held) -> bool:
        keys, args = self._release_call(key, held)
        parent = self._parent
        try:
            return bool(await parent._run_async(PERMIT_RELEASE, key, keys, args))
        except BackendUnavailable as error:
            reword(error, key, self._where, self.shape)
            raise
        except asyncio.CancelledError:
            # as for a lock: a release, once started, completes (the script is safe to rerun)
            parent._connections.finish(lambda: parent._run_async(PERMIT_RELEASE, key, keys, args))
            raise

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        keys, args = self._extend_call(key, owner, ttl)
        sent_at, sent = time.time(), time.monotonic()
        wait = self.replication.wait(None)
        try:
            reply = self._connections.run_sync(PERMIT_EXTEND, key, keys, args, None, wait)
        except BackendUnavailable as error:
            reword(error, key, self._where, self.shape)
            raise
        return self._extended(key, held, ttl, sent, sent_at, reply, token)  # (LeaseLost if not)

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        keys, args = self._extend_call(key, owner, ttl)
        sent_at, sent = time.time(), time.monotonic()
        wait = self.replication.wait(None)
        try:
            reply = await self._connections.run(PERMIT_EXTEND, key, keys, args, None, wait)
        except BackendUnavailable as error:
            reword(error, key, self._where, self.shape)
            raise
        return self._extended(key, held, ttl, sent, sent_at, reply, token)

    def _extend_call(self, key: str, owner: bytes, ttl: float) -> tuple[list[str], list[Arg]]:
        return self._parent.layout.permit_extend(key), [owner, ttl_ms(ttl, key)]

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        """What Redis says (a permit held here may be lost there): live permits of every
        process, the newest holder's token and owner, everyone in line there, and this
        process's callers queued in front of it."""
        parent = self._parent
        keys = parent.layout.permit(key, b"")[:4]
        try:
            reply = parent._run_sync(PERMIT_STATS, key, keys, [])
        except BackendUnavailable as error:
            reword(error, key, self._where, self.shape)
            raise
        holders, token, owner, waiting, *_ = cast("list[int | bytes]", reply)
        waiting = local.waiting + int(waiting)
        if not holders:
            return KeyStatistics(key, False, None, None, waiting)
        return KeyStatistics(key, True, int(token), bytes(owner), waiting, int(holders))

    # ------------------------------------------------------------ the parent's threads

    def _track(self, lease: Lease) -> None:
        self._parent._track(lease)

    def _untrack(self, lease: Lease) -> None:
        self._parent._untrack(lease)


register_permits(RedisBackend, permit_view)
