"""Leases across hosts on Redis: one round trip to acquire, fencing tokens that never go back,
waiters woken by pub/sub, and one background renewer per backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, cast

from ..._validate import check_backend_ttl
from ...errors import LeaseLost
from .._renewer import AutoRenewed, Renewal, Renewer
from .._tiered import Flow, Held, Tier, TieredBackend
from .._unclosed import Unclosed
from ..base import Deadline, Grant, KeyStatistics, shape_of
from ._clients import AsyncClient, SyncClient, check_clients, from_url
from ._connections import Connections, closed_check
from ._flow import AcquireFlow, RedisFlow, ServerClock, Trip, check_seconds, extend_call, lost
from ._keys import Layout
from ._listener import Waiting
from ._renewer import renew_all
from ._replicas import check_replication, granted, unreplicated
from ._scripts import EXTEND, FENCE_SLACK_MS, RELEASE, RELEASE_MARK_MS, Script
from ._sentinel import for_sentinel
from ._wire import Arg, map_errors

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._waiters import Waiter

__all__ = ["RedisBackend"]

logger = logging.getLogger("keylock")

_MAX_POLL = 86_400.0  # a waiter's place in line lasts 3 polls: keep it within a Redis TTL


class RedisBackend(Unclosed, AutoRenewed, TieredBackend):
    """Per-key leases shared by every process and host using one Redis (or Cluster).

    Acquire is one round trip (a script: ``SET NX PX`` plus the fencing token); release and
    extend are compare-owner-then-act scripts, so only the acquisition that took a lease can end
    or extend it, and a lost lease raises :class:`~keylock.LeaseLost`. Waiters queue FIFO across
    clients; a release hands the key to the head of the line and wakes its process by pub/sub
    (one subscriber connection per backend), with the holder's expiry and a bounded safety-net
    poll as fallbacks. Within this process, callers queue FIFO in front of Redis (the memory
    backend), so a hot key costs one waiter per process on Redis.

    Leases always have a TTL (``ttl``, default 30 s). With ``auto_renew`` (the default) one
    background thread per backend renews held leases at a third of their TTL; when a renewal
    finds the lease gone, ``lease.lost`` turns true, ``on_lost`` runs (never on that thread),
    and with ``cancel_on_lost`` the critical section is cancelled. Connection errors surface
    as :class:`~keylock.BackendUnavailable`, never as a phantom grant.

    With ``replicas=N``, a grant, an extend and a hand-off count only once *N* replicas
    acknowledged them (``WAIT``, within ``replica_timeout``): a grant they did not is given
    back and raises BackendUnavailable; an extend they did not raises BackendUnavailable and
    leaves the lease its last replicated expiry (the renewer keeps trying, then reports it
    lost). With ``sentinel=`` (a ``redis.sentinel.Sentinel`` or a list of (host, port)
    Sentinel addresses) and ``service=``, or a ``redis+sentinel://`` URL, the backend follows
    the primary through a failover. See docs/failover.md.
    """

    nonblocking_step = False
    needs_owner = True
    permit_module = "keylock.backends.redis._permits"  # semaphores and RW locks

    def __init__(
        self,
        client: SyncClient | None = None,
        *,
        async_client: AsyncClient | None = None,
        ttl: float = 30.0,
        auto_renew: bool = True,
        prefix: str = "keylock",
        poll: float = 1.0,
        replicas: int = 0,
        replica_timeout: float = 1.0,
        sentinel: object = None,
        service: str | None = None,
    ) -> None:
        if sentinel is not None:  # a Sentinel, or Sentinel addresses: follow the primary
            if client is not None or async_client is not None:
                raise TypeError("RedisBackend takes a client or sentinel=, not both")
            client = for_sentinel(sentinel, service)
        check_clients(client, async_client)
        check_backend_ttl(ttl, "RedisBackend", required=True)  # the per-call rules, then:
        self.default_ttl = self._ttl = check_seconds("ttl", ttl, (2**52 - FENCE_SLACK_MS) / 1000)
        self.replication = check_replication(replicas, replica_timeout, self._ttl)
        self.replicas = self.replication.replicas
        self.layout = Layout(prefix)  # checks the prefix
        self.prefix = prefix
        self.auto_renew = bool(auto_renew)
        self.poll = check_seconds("poll", poll, _MAX_POLL)
        # how long a queued waiter stays in line without coming back (it does every poll)
        self._stay_ms = int(self.poll * 3000) + 1000
        self._connections = Connections(client, async_client)
        self._connections.if_closed = closed_check(self)
        self._where = self._connections.where
        self._start_process()
        _BACKENDS.add(self)
        self._opened()  # from here on, it must be closed (else a ResourceWarning when collected)

    def _start_process(self) -> None:
        """The state that belongs to one process (set again in a forked child, which holds
        none of its parent's leases and must run its own listener and renewer threads)."""
        # this process's own wake-up channel: a hand-off wakes the one process it concerns
        self._channel = self.layout.wake_channel(os.urandom(8).hex())
        self._tier = Tier()  # FIFO among this backend's own callers, and the keys held
        self._connections.restart()  # their sockets are the parent's
        self.server_clock = ServerClock()  # read from queueing replies; dates hand-offs
        self._waiting = Waiting(self._sync, self._channel, self.server_clock, self._where)
        self._renewer = None
        self._permit_owners: set[bytes] = set()  # leases the renewer extends as permits

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: float = 30.0,
        auto_renew: bool = True,
        prefix: str = "keylock",
        poll: float = 1.0,
        cluster: bool = False,
        replicas: int = 0,
        replica_timeout: float = 1.0,
        **client_options: object,
    ) -> RedisBackend:
        """A backend on the server at *url* (``redis://``, ``rediss://``, ``unix://``); with
        ``cluster=True``, on the Redis Cluster that the node at *url* belongs to. An option
        no redis-py client takes is a TypeError here, not at the first command. With
        ``replicas=N``, every grant, extend and hand-off waits for *N* replicas (at most
        ``replica_timeout`` s): see the class docstring."""
        check_replication(replicas, replica_timeout, float("inf"))  # (before any connection)
        client = from_url(url, cluster=cluster, options=client_options)
        backend = cls(
            client,
            ttl=ttl,
            auto_renew=auto_renew,
            prefix=prefix,
            poll=poll,
            replicas=replicas,
            replica_timeout=replica_timeout,
        )
        backend._connections.url = url  # async clients are made from the URL too
        backend._connections.options = client_options
        return backend

    def __repr__(self) -> str:
        return f"RedisBackend({self._where})"

    # ------------------------------------------------------------------------ clients, wire

    def _sync(self) -> SyncClient:
        return self._connections.sync()

    def _async(self) -> AsyncClient:
        """The async client for the running event loop."""
        return self._connections.async_()

    def _run_sync(
        self,
        script: Script,
        key: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        bound: float | None = None,
    ) -> object:
        return self._connections.run_sync(script, key, keys, args, bound)

    async def _run_async(
        self,
        script: Script,
        key: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        bound: float | None = None,
    ) -> object:
        return await self._connections.run(script, key, keys, args, bound)

    # ------------------------------------------------------------------- the arbiter's part

    # The shared core (keylock.backends._tiered) queues this backend's own callers FIFO, then
    # drives a RedisFlow: a caller that may wait joins the Redis queue in its first trip and
    # is watched for a hand-off before that trip, so no hand-off can slip past it; it sleeps
    # until the key is handed to it, the holder's expiry, or the safety-net poll. A caller
    # that gives up leaves the Redis queue (LEAVE, finishing alone after GIVE_UP_WAIT).

    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        return RedisFlow(self, key, owner, ttl, deadline, waiter, local)

    def _protocol(
        self,
        key: str,
        owner: bytes,
        timeout: float | None,
        ttl: float | None,
        now: float | None = None,
    ) -> AcquireFlow:
        """The protocol state of one acquire (sans-IO: see _flow.AcquireFlow)."""
        return AcquireFlow(
            self.layout,
            key,
            owner,
            ttl=self._ttl if ttl is None else ttl,
            timeout=timeout,
            now=time.monotonic() if now is None else now,
            channel=self._channel,
            stay_ms=self._stay_ms,
            poll=self.poll,
            renewed=self.auto_renew,
            confirm=self.replicas > 0,
        )

    def _trip_sync(self, flow: Flow, trip: object) -> object:
        assert isinstance(trip, Trip)
        script, keys, args, bound = trip
        wait = self.replication.wait(bound)
        if wait is None:
            return self._run_sync(script, flow.key, keys, args, bound)
        replies = self._connections.run_sync(script, flow.key, keys, args, bound, wait)
        return granted(self.replication, flow.key, self._where, replies, self)

    async def _trip(self, flow: Flow, trip: object) -> object:
        assert isinstance(trip, Trip)
        script, keys, args, bound = trip
        wait = self.replication.wait(bound)
        if wait is None:
            return await self._run_async(script, flow.key, keys, args, bound)
        replies = await self._connections.run(script, flow.key, keys, args, bound, wait)
        return granted(self.replication, flow.key, self._where, replies, self)

    def _left_sync(self, flow: Flow) -> None:
        trip = flow.leaving()
        if isinstance(trip, Trip):
            in_flight = isinstance(flow, RedisFlow) and flow.protocol.in_flight
            self._connections.leave_sync(trip.script, flow.key, trip.keys, trip.args, in_flight)

    async def _left(self, flow: Flow) -> None:
        trip = flow.leaving()
        if isinstance(trip, Trip):
            await self._connections.leave(trip.script, flow.key, trip.keys, trip.args)

    def _local_ttl(self, ttl: float | None) -> float | None:
        return None  # the turn is dated once Redis granted the lease: see _adopt

    def _adopt(self, flow: Flow) -> Grant:
        grant = super()._adopt(flow)
        if not self.auto_renew and grant[2] is not None:
            # nobody renews: the in-process turn lapses with the lease, so the next caller
            # here takes over an expired lease as a caller elsewhere would
            left = max(grant[2] - time.monotonic(), 0.001)
            with contextlib.suppress(LeaseLost):
                self._tier.local.extend_sync(flow.key, flow.owner, flow.local[0], left)
        return grant

    def _release_local(self, key: str, held: Held) -> bool:
        # Redis decides whether the lease was still ours; the in-process turn only orders the
        # callers of this process (one that lapsed a moment early is no loss)
        super()._release_local(key, held)
        return True

    def _end_sync(self, key: str, held: Held) -> bool:
        keys = self.layout.acquire(key, held.owner)
        return bool(self._run_sync(RELEASE, key, keys, [held.owner, key, RELEASE_MARK_MS]))

    async def _end(self, key: str, held: Held) -> bool:
        keys = self.layout.acquire(key, held.owner)
        args: list[Arg] = [held.owner, key, RELEASE_MARK_MS]
        try:
            return bool(await self._run_async(RELEASE, key, keys, args))
        except asyncio.CancelledError:
            # A release, once started, completes even if its caller is cancelled: the cancel
            # cut redis-py off mid-call, so the script may or may not have run; running it again
            # is harmless (it compares the owner), and skipping it would strand the key.
            self._connections.finish(lambda: self._run_async(RELEASE, key, keys, args))
            raise

    def _extended(
        self,
        key: str,
        held: Held,
        ttl: float,
        sent: float,
        sent_at: float,
        reply: object,
        token: int,
    ) -> Grant:
        """After an extend: LeaseLost if it was not ours; BackendUnavailable if too few
        replicas acknowledged it (the lease keeps its dates: at risk, not lost); without
        auto-renew, the in-process turn lapses with the lease."""
        acked: object = self.replicas
        if self.replicas:
            reply, acked = cast("tuple[object, object]", reply)
        if not reply:
            raise lost(key, token)
        short = self.replication.short(acked)
        if short is not None:
            raise unreplicated(key, self._where, self.replication, short, "extend", shape_of(self))
        if not self.auto_renew:
            with contextlib.suppress(LeaseLost):  # (Redis, not the turn, decides)
                self._tier.local.extend_sync(key, held.owner, held.local_token, ttl)
        return Grant(held.token, sent_at + ttl, sent + ttl)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        keys, args = extend_call(self.layout, key, owner, ttl)
        sent_at, sent = time.time(), time.monotonic()
        wait = self.replication.wait(None)
        reply = self._connections.run_sync(EXTEND, key, keys, args, None, wait)
        return self._extended(key, held, ttl, sent, sent_at, reply, token)

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        keys, args = extend_call(self.layout, key, owner, ttl)
        sent_at, sent = time.time(), time.monotonic()
        wait = self.replication.wait(None)
        reply = await self._connections.run(EXTEND, key, keys, args, None, wait)
        return self._extended(key, held, ttl, sent, sent_at, reply, token)

    async def _holder_async(self, key: str) -> int | None:
        """The token of *key*'s live lease, or None when nobody holds it (async)."""
        lock_key, fence_key = self.layout.lock(key)[:2]
        with map_errors(key, self._where):
            pipe = self._async().pipeline(transaction=False)
            pipe.get(lock_key)
            pipe.get(fence_key)
            owner, token = await pipe.execute()
        return int(token) if owner is not None and token else None

    def statistics(self, key: str) -> KeyStatistics:
        if self._shut:
            raise self._closed_error(key)
        return self._arbiter_statistics(key, self._tier.local.statistics(key))

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        """What Redis says (a lease held here may be lost there), with this process's queue."""
        lock_key, fence_key = self.layout.lock(key)[:2]
        with map_errors(key, self._where):
            pipe = self._sync().pipeline(transaction=False)
            pipe.get(lock_key)
            pipe.get(fence_key)
            owner, token = pipe.execute()
        waiting = local.waiting + self._waiting.count(key)
        if owner is None:
            return KeyStatistics(key, False, None, None, waiting)
        return KeyStatistics(key, True, int(token) if token else None, bytes(owner), waiting)

    # ------------------------------------------------------------------------- auto-renew

    def _new_renewer(self) -> Renewer:
        return Renewer(self._renewal(), self._ttl / 3, name="keylock-redis-renewer")

    def _renewal(self) -> Renewal:
        """How the renewer extends a batch of leases (and permits): one pipelined round
        trip per kind."""
        return renew_all(self._connections, self.layout, self._permit_owners, self.replication)

    # ----------------------------------------------------------------------------- closing

    def close_sync(self) -> None:
        self._shut = True
        self._closing()
        self._stop_renewing()
        self._waiting.stop()
        self._connections.close_sync()

    async def close(self) -> None:
        self._shut = True
        self._closing()
        await self._connections.settle()  # calls finishing in the background land first
        self._stop_renewing()
        self._waiting.stop()
        await self._connections.close()


# Every backend of this process, so a forked child can start each afresh (see _start_process).
_BACKENDS: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._start_process()


os.register_at_fork(after_in_child=_after_fork_in_child)
