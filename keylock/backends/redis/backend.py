"""Leases across hosts on Redis: one round trip to acquire, fencing tokens that never go back,
waiters woken by pub/sub, and one background renewer per backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ...errors import BackendUnavailable, LeaseLost, LockTimeout
from ..base import Backend, Grant, KeyStatistics, LoopWaiter, ThreadWaiter, Waiter
from ..memory import MemoryBackend
from ._clients import GIVE_UP_WAIT, AsyncClient, Connections, SyncClient, check_clients, from_url
from ._flow import AcquireFlow, ServerClock, check_seconds, extend_call, lost
from ._keys import Layout
from ._listener import Waiting
from ._renewer import Renewal, Renewer, extend_all
from ._scripts import ACQUIRE, EXTEND, FENCE_SLACK_MS, LEAVE, RELEASE, Script
from ._wire import Arg, background, in_background, map_errors

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ...lease import Lease

__all__ = ["RedisBackend"]

logger = logging.getLogger("keylock")

_MAX_POLL = 86_400.0  # a waiter's place in line lasts 3 polls: keep it within a Redis TTL


class _Held:
    """A lease this backend holds on Redis, and its turn in the in-process queue."""

    __slots__ = ("local_token", "owner", "token")

    def __init__(self, token: int, owner: bytes, local_token: int) -> None:
        self.token = token
        self.owner = owner
        self.local_token = local_token


class RedisBackend(Backend):
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
    """

    nonblocking_step = False
    needs_owner = True

    def __init__(
        self,
        client: SyncClient | None = None,
        *,
        async_client: AsyncClient | None = None,
        ttl: float = 30.0,
        auto_renew: bool = True,
        prefix: str = "keylock",
        poll: float = 1.0,
    ) -> None:
        check_clients(client, async_client)
        self.default_ttl = self._ttl = check_seconds("ttl", ttl, (2**52 - FENCE_SLACK_MS) / 1000)
        self.layout = Layout(prefix)  # checks the prefix
        self.prefix = prefix
        self.auto_renew = bool(auto_renew)
        self.poll = check_seconds("poll", poll, _MAX_POLL)
        # how long a queued waiter stays in line without coming back (it does every poll)
        self._stay_ms = int(self.poll * 3000) + 1000
        self._connections = Connections(client, async_client)
        self._where = self._connections.where
        self._start_process()
        _BACKENDS.add(self)

    def _start_process(self) -> None:
        """The state that belongs to one process (set again in a forked child, which holds
        none of its parent's leases and must run its own listener and renewer threads)."""
        # this process's own wake-up channel: a hand-off wakes the one process it concerns
        self._channel = self.layout.wake_channel(os.urandom(8).hex())
        self._local = MemoryBackend()  # FIFO among this backend's own callers
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}  # guarded by _mutex
        self._connections.restart()  # their sockets are the parent's
        self.clock = ServerClock()  # read from queueing replies; dates hand-offs
        self._waiting = Waiting(self._sync, self._channel, self.clock)
        self._renewer: Renewer | None = None

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
        **client_options: object,
    ) -> RedisBackend:
        """A backend on the server at *url* (``redis://``, ``rediss://``, ``unix://``); with
        ``cluster=True``, on the Redis Cluster that the node at *url* belongs to. An option
        no redis-py client takes is a TypeError here, not at the first command."""
        client = from_url(url, cluster=cluster, options=client_options)
        backend = cls(client, ttl=ttl, auto_renew=auto_renew, prefix=prefix, poll=poll)
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

    # ------------------------------------------------------------------------ acquire, twice

    # Two phases: this backend's own FIFO queue (the memory backend: timeouts, cancellation),
    # then Redis, where the waiter sleeps until the key is handed to it, the holder's expiry,
    # or the safety-net poll. A caller that may wait joins the Redis queue in its first trip,
    # and is watched for a hand-off before that trip, so no hand-off can slip past it. A
    # caller that gives up leaves the Redis queue (see _give_up). The twins differ only in
    # how they call and how they wait; every decision is the flow's.

    def _flow(
        self, key: str, owner: bytes, timeout: float | None, ttl: float | None
    ) -> AcquireFlow:
        return AcquireFlow(
            self.layout,
            key,
            owner,
            ttl=self._ttl if ttl is None else ttl,
            timeout=timeout,
            now=time.monotonic(),
            channel=self._channel,
            stay_ms=self._stay_ms,
            poll=self.poll,
            renewed=self.auto_renew,
        )

    async def acquire(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        flow = self._flow(key, owner, timeout, ttl)
        local_ttl = self._local_ttl(flow.ttl)
        local = self._local._try_acquire(key, owner, local_ttl, None) or (
            await self._local.acquire(key, owner, timeout=timeout, ttl=local_ttl)
        )
        waiter = LoopWaiter(owner, flow.ttl) if flow.waits else None
        try:
            if waiter is not None:
                listener = self._waiting.watch(flow, waiter)
                until = time.monotonic() + min(1.0, flow.bound(time.monotonic()) or 1.0)
                # a new listener subscribes before we queue (a threading.Event: polled)
                while not listener.subscribed.is_set() and time.monotonic() < until:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            while True:
                if waiter is not None:
                    waiter.prepare()
                if (trip := flow.next_trip(time.monotonic())) is None:
                    break
                sent = time.time()
                try:
                    reply = await self._run_async(ACQUIRE, key, trip.keys, trip.args, trip.bound)
                except BackendUnavailable as exc:
                    raise flow.failed(exc, time.monotonic()) from exc.__cause__
                if self._granted(flow, reply, sent):
                    break
                await waiter.wait(flow.wait_time(time.monotonic()))  # type: ignore[union-attr]
            return self._adopt(key, owner, local, flow)
        except BaseException:
            self._local._discard_sync(key, owner, local)
            if (args := flow.leave_args()) is not None:
                leave = in_background(self._run_async(LEAVE, key, flow.keys, args))
                await asyncio.wait({leave}, timeout=GIVE_UP_WAIT)  # it lands, or goes on alone
            raise
        finally:
            if waiter is not None:
                self._waiting.unwatch(key, owner)

    def acquire_sync(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        flow = self._flow(key, owner, timeout, ttl)
        local_ttl = self._local_ttl(flow.ttl)
        local = self._local._try_acquire(key, owner, local_ttl, None) or (
            self._local.acquire_sync(key, owner, timeout=timeout, ttl=local_ttl)
        )
        waiter = ThreadWaiter(owner, flow.ttl) if flow.waits else None
        try:
            if waiter is not None:
                listener = self._waiting.watch(flow, waiter)
                listener.subscribed.wait(min(1.0, flow.bound(time.monotonic()) or 1.0))
            while True:
                if waiter is not None:
                    waiter.prepare()
                if (trip := flow.next_trip(time.monotonic())) is None:
                    break
                sent = time.time()
                try:
                    reply = self._run_sync(ACQUIRE, key, trip.keys, trip.args, trip.bound)
                except BackendUnavailable as exc:
                    raise flow.failed(exc, time.monotonic()) from exc.__cause__
                if self._granted(flow, reply, sent):
                    break
                waiter.wait(flow.wait_time(time.monotonic()))  # type: ignore[union-attr]
            return self._adopt(key, owner, local, flow)
        except BaseException:
            self._local._discard_sync(key, owner, local)
            if (args := flow.leave_args()) is not None:
                self._connections.leave_sync(LEAVE, key, flow.keys, args, flow.in_flight)
            raise
        finally:
            if waiter is not None:
                self._waiting.unwatch(key, owner)

    def _granted(self, flow: AcquireFlow, reply: object, sent: float) -> bool:
        subscribed = self._waiting.subscribed()
        return flow.on_reply(reply, sent, time.time(), time.monotonic(), self.clock, subscribed)

    def _adopt(self, key: str, owner: bytes, local: Grant, flow: AcquireFlow) -> Grant:
        """Record a lease granted on Redis (by our script, or handed to us at a release)."""
        grant = flow.grant
        assert grant is not None  # the loops above end only with a grant
        with self._mutex:
            self._held[key] = _Held(grant[0], owner, local[0])
        return grant

    def _try_acquire(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        # the step of the protocol: one try, without queueing (acquire_sync with timeout=0)
        try:
            return self.acquire_sync(key, owner, timeout=0, ttl=ttl)
        except LockTimeout:
            return None

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        self._waiting.unwatch(key, waiter.owner)
        return None

    def _local_ttl(self, ttl: float) -> float | None:
        # Without renewal the in-process turn lapses with the Redis lease, so the next caller
        # here can take over an expired lease as a caller elsewhere would.
        return None if self.auto_renew else ttl

    # ---------------------------------------------------------------------- release, extend

    def _pop_held(self, key: str, owner: bytes, token: int) -> _Held:
        with self._mutex:
            held = self._held.get(key)
            if held is None or held.token != token or held.owner != owner:
                raise lost(key, token)
            del self._held[key]
            return held

    def _release_local(self, key: str, held: _Held) -> None:
        with contextlib.suppress(LeaseLost):  # its in-process turn lapsed with it: fine
            self._local.release_sync(key, held.owner, held.local_token)

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        held = self._pop_held(key, owner, token)
        try:
            released = self._run_sync(RELEASE, key, self.layout.lock(key), [owner, key])
        finally:
            self._release_local(key, held)
        if not released:
            raise lost(key, token)

    async def release(self, key: str, owner: bytes, token: int) -> None:
        held = self._pop_held(key, owner, token)
        keys = self.layout.lock(key)
        try:
            released = await self._run_async(RELEASE, key, keys, [owner, key])
        except asyncio.CancelledError:
            # A release, once started, completes even if its caller is cancelled: the cancel
            # cut redis-py off mid-call, so the script may or may not have run; running it again
            # is harmless (it compares the owner), and skipping it would strand the key.
            in_background(self._run_async(RELEASE, key, keys, [owner, key]))
            raise
        finally:
            self._release_local(key, held)
        if not released:
            raise lost(key, token)

    def _extend_call(
        self, key: str, owner: bytes, token: int, ttl: float
    ) -> tuple[list[str], list[Arg]]:
        with self._mutex:
            held = self._held.get(key)
        if held is None or held.token != token or held.owner != owner:
            raise lost(key, token)
        return extend_call(self.layout, key, owner, ttl)

    def _extended(self, key: str, owner: bytes, token: int, ttl: float, sent: float) -> None:
        """After an extend: the renewer follows the new TTL; without auto-renew, the
        in-process turn lapses with the lease."""
        if self._renewer is not None:
            self._renewer.extended(key, token, ttl, sent)
        if not self.auto_renew:
            with self._mutex:
                held = self._held.get(key)
            if held is not None:
                self._local.extend_sync(key, owner, held.local_token, ttl)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        keys, args = self._extend_call(key, owner, token, ttl)
        sent_at, sent = time.time(), time.monotonic()
        if not self._run_sync(EXTEND, key, keys, args):
            raise lost(key, token)
        self._extended(key, owner, token, ttl, sent)
        return sent_at + ttl

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> float:
        keys, args = self._extend_call(key, owner, token, ttl)
        sent_at, sent = time.time(), time.monotonic()
        if not await self._run_async(EXTEND, key, keys, args):
            raise lost(key, token)
        self._extended(key, owner, token, ttl, sent)
        return sent_at + ttl

    async def _discard(self, key: str, owner: bytes, grant: Grant) -> None:
        with contextlib.suppress(LeaseLost):
            await self.release(key, owner, grant[0])

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
        lock_key, fence_key = self.layout.lock(key)[:2]
        with map_errors(key, self._where):
            pipe = self._sync().pipeline(transaction=False)
            pipe.get(lock_key)
            pipe.get(fence_key)
            owner, token = pipe.execute()
        local = self._local.statistics(key)
        waiting = local.waiting + self._waiting.count(key)
        if owner is None:
            return KeyStatistics(key, False, None, None, waiting)
        if isinstance(owner, str):  # a client with decode_responses=True
            owner = owner.encode("utf-8", "surrogateescape")
        return KeyStatistics(key, True, int(token) if token else None, bytes(owner), waiting)

    # ------------------------------------------------------------------------- auto-renew

    def _track(self, lease: Lease) -> None:
        if self.auto_renew and lease.ttl:
            with self._mutex:
                if self._renewer is None:
                    self._renewer = Renewer(self._renewal(), self._ttl / 3)
            self._renewer.add(lease)

    def _renewal(self) -> Renewal:
        """How the renewer extends a batch of leases: one pipelined round trip."""
        return extend_all(self._connections, self.layout)

    def _untrack(self, lease: Lease) -> None:
        if self._renewer is not None:
            self._renewer.remove(lease)

    # ----------------------------------------------------------------------------- closing

    def close_sync(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
        self._waiting.stop()
        self._connections.close_sync()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        finishing = [task for task in background if task.get_loop() is loop]
        if finishing:  # releases finishing for cancelled callers: let them land first
            await asyncio.wait(finishing, timeout=5)
        if self._renewer is not None:
            self._renewer.stop()
        self._waiting.stop()
        await self._connections.close()

    def _single_flight(self, namespace: str, serializer: object = None) -> object:
        from .._redis_flight import JSON, RemoteFlights

        return RemoteFlights(self, namespace, serializer or JSON)  # type: ignore[arg-type]


# Every backend of this process, so a forked child can start each afresh (see _start_process).
_BACKENDS: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._start_process()


os.register_at_fork(after_in_child=_after_fork_in_child)
