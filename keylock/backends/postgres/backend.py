"""Leases across hosts on Postgres: a lease table, waiters woken by LISTEN/NOTIFY, fencing
tokens floored at the server clock, and one renewer thread per backend."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from typing import TYPE_CHECKING, cast

from ...errors import BackendUnavailable
from .._renewer import AutoRenewed, Renewer
from .._tiered import Held, Tier, TieredBackend
from .._unclosed import Unclosed
from ..base import Grant, KeyStatistics
from ._flow import LEAVE, QUEUE, TRY, PostgresFlow
from ._sql import schema_for, stored

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

    import psycopg_pool

    from ...lease import Lease
    from .._tiered import Flow
    from .._waiters import Waiter
    from ..base import Deadline
    from ._permit_sql import PermitSchema
    from ._sql import Schema
    from ._wire import Rows

__all__ = ["PostgresBackend"]

_LEAVE_AT_CLOSE = 3.0  # s: how long a close spends taking its waiters out of the server's line


class PostgresBackend(Unclosed, AutoRenewed, TieredBackend):
    """Per-key leases shared by every process and host using one Postgres database.

    A lease table, not advisory locks (the design and its costs: ``docs/backends/postgres.md``):
    a key is one row in ``table`` (default ``keylock_leases``, created on first use); acquire,
    release and give-up are one statement each, in autocommit, holding no session state, so
    it runs behind a transaction-mode PgBouncer and holds no connection while a key is held.

    * **Leases** always have a TTL (``ttl``, default 30 s), renewed by one thread per backend
      with ``auto_renew``; a renewal that finds the lease gone or lapsed marks it lost
      (``lease.lost``, ``on_lost``, ``cancel_on_lost``). A dead holder loses the key within
      its TTL; release and extend of a lost lease raise LeaseLost.
    * **Tokens** are ``max(last + 1, server clock in µs)``: strictly increasing per key, never
      reused, even after the table is truncated.
    * **Waiting is FIFO** (in memory within a process, in ``<table>_queue`` between processes)
      and needs no polling: a release hands the key to the head of the line and NOTIFYs its
      process, whose one LISTEN session gives the grant to the waiter; a bounded safety-net
      poll (``poll`` s) keeps a place alive, and a dead waiter's place lapses. Behind a
      transaction-mode pooler, point ``listen_conninfo`` at the server.
    * **Durability**: the tables are UNLOGGED by default (a crash ends every lease, holders
      are told, tokens never go back); ``durable=True`` makes them logged and flushes each
      commit. **Errors** are :class:`~keylock.BackendUnavailable` naming ``host:port/db``,
      never the password. **Close** makes every call raise BackendUnavailable and takes the
      waiters still in line out of it.
    * ``permits(limit, weight)`` views (``KeyedSemaphore``, ``KeyedRWLock``) keep permits in
      ``<table>_permits`` with the same costs and guarantees.

    ``PostgresBackend(pool)`` takes your psycopg pool (sync or async); the other flavour and
    the background threads use a small pool of the same options. A forked child holds none of
    its parent's leases and opens its own connections.
    """

    nonblocking_step = False
    needs_owner = True
    permit_module = "keylock.backends.postgres._permits"  # semaphores and RW locks

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool,
        *,
        ttl: float = 30.0,
        auto_renew: bool = True,
        table: str = "keylock_leases",
        poll: float = 1.0,
        listen_conninfo: str | None = None,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
        durable: bool = False,
    ) -> None:
        import psycopg_pool

        from . import _wire

        if not ttl > 0:
            raise ValueError(f"PostgresBackend ttl must be a positive number of seconds, not {ttl}")
        if not poll > 0:
            raise ValueError(f"PostgresBackend poll must be a positive number of seconds: {poll}")
        self.default_ttl = self._ttl = float(ttl)
        self.auto_renew = auto_renew
        self.poll = float(poll)
        self._schema = schema_for(table, durable=durable)
        self._durable = durable
        self._pool_size = pool_size
        self._timeout = connect_timeout
        self._conninfo, self._connect_kwargs = _wire.connect_options(pool)
        if listen_conninfo is not None:
            self._conninfo = listen_conninfo
        self._user_sync: psycopg_pool.ConnectionPool | None = None
        self._user_async: psycopg_pool.AsyncConnectionPool | None = None
        if isinstance(pool, psycopg_pool.AsyncConnectionPool):
            self._user_async = pool
        elif isinstance(pool, psycopg_pool.ConnectionPool):
            self._user_sync = pool
        else:
            raise TypeError(
                "PostgresBackend needs a psycopg_pool.ConnectionPool or AsyncConnectionPool, not "
                f"{type(pool).__name__}: or use PostgresBackend.from_url(url)"
            )
        self._where = _wire.address(*_wire.connect_options(pool))
        # how long a waiter stays in line without coming back (it does every poll)
        self._stay_ms = int(self.poll * 3000) + 1000
        self._start_process()
        from ._connections import started

        started(self)
        self._opened()  # from here on, it must be closed (else a ResourceWarning when collected)

    def _after_fork(self) -> None:
        """In a forked child: none of the parent's leases, listener or connections."""
        from ._connections import abandon

        abandon(self._connections)
        if self._owned_sync:
            self._user_sync = None  # the parent's pool: the child makes its own
        self._start_process()

    def _start_process(self) -> None:
        """The state that belongs to one process (made again in a forked child)."""
        from ._connections import Connections
        from ._waiting import Waiting

        self._tier = Tier()
        self._channel = f"keylock_{os.urandom(8).hex()}"
        self._waiting = Waiting(self._conninfo, self._connect_kwargs, self._channel)
        self._renewer = None
        self._connections = Connections(
            self._schema,
            self._conninfo,
            self._connect_kwargs,
            user_sync=self._user_sync,
            user_async=self._user_async,
            owned_sync=self._owned_sync,
            pool_size=self._pool_size,
            timeout=self._timeout,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: float = 30.0,
        auto_renew: bool = True,
        table: str = "keylock_leases",
        poll: float = 1.0,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
        durable: bool = False,
        **connect_options: object,
    ) -> PostgresBackend:
        """A backend on the database at *url* (``postgresql://user:pw@host:port/db``, or a
        conninfo string); *connect_options* go to ``psycopg.connect``. Connects on first use.
        ``durable=True``: logged tables, and the WAL flushed at every grant (see the class
        docstring)."""
        from . import _wire
        from ._url import check_options, check_url

        own = inspect.signature(cls.from_url).parameters  # (for the nearest name to a typo)
        check_options(connect_options, [name for name in own if name != "connect_options"])
        options = {"connect_timeout": max(int(connect_timeout), 1), **connect_options}
        check_url(url)  # a malformed URL: ValueError with the expected form, no password
        pool = _wire.sync_pool(url, options, pool_size, connect_timeout)
        backend = cls(
            pool,
            ttl=ttl,
            auto_renew=auto_renew,
            table=table,
            poll=poll,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            durable=durable,
        )
        backend._owned_sync = backend._connections.owned_sync = True
        return backend

    _owned_sync = False  # the sync pool was made by from_url: this backend closes it
    _permit_renew: str | None = None  # renews locks and permits: set once permits are used

    def __repr__(self) -> str:
        return f"PostgresBackend({self._where}, table={self._schema.table!r})"

    # ------------------------------------------------------------------- the statements

    # Every statement but the close's own goes through these two, which hold the closed gate:
    # after close() no statement is sent (it would open a pool nobody closes), and one the
    # close cut off says what one after it says (see TieredBackend._closed_error).

    def _run_sync(
        self, key: str, sql: str, params: Sequence[object], until: float | None = None
    ) -> Rows:
        if self._shut:
            raise self._closed_error(key)
        try:
            return self._connections.run_sync(key, sql, params, until)
        except BackendUnavailable as exc:
            self._raise_if_shut(key, exc)
            raise

    async def _run(
        self, key: str, sql: str, params: Sequence[object], until: float | None = None
    ) -> Rows:
        if self._shut:
            raise self._closed_error(key)
        try:
            return await self._connections.run(key, sql, params, until)
        except BackendUnavailable as exc:
            self._raise_if_shut(key, exc)
            raise

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
        flow = PostgresFlow(
            key, owner, ttl or self._ttl, deadline, waiter, local, self.poll, self._waiting.clock
        )
        flow.leave_sql = self._statements().leave
        if deadline.timeout != 0:
            self._waiting.add(flow)
        return flow

    def _local_ttl(self, ttl: float | None) -> float | None:
        return None  # waiting for another process must not eat the lease: see _adopt

    def _arm(self, flow: Flow) -> None:
        """Before a trip: pick the poll (short until the listener is LISTENing)."""
        assert isinstance(flow, PostgresFlow)
        flow.poll = self._waiting.poll(self.poll)

    def _acquire_params(self, flow: Flow, trip: Hashable) -> list[object]:
        ttl_ms = max(int((flow.ttl or self._ttl) * 1000), 1)
        # a key handed to this waiter is its for the claim window, and its renewer extends it
        # within a third of that; without auto-renew nobody would: the whole TTL, then
        claim_ms = min(ttl_ms, self._stay_ms) if self.auto_renew else ttl_ms
        return [
            stored(flow.key),
            flow.owner,
            ttl_ms,
            trip != TRY,
            self._stay_ms,
            claim_ms,
            self._channel,
        ]

    def _trip_sync(self, flow: Flow, trip: Hashable) -> object:
        sql = self._statements()
        if trip == LEAVE:
            return self._run_sync(
                flow.key, sql.leave, [stored(flow.key), flow.owner], flow.deadline.at
            )
        self._arm(flow)
        params = self._trip_params(flow, trip)
        rows = self._run_sync(flow.key, sql.acquire, params, flow.deadline.at)
        return self._queued(trip, rows[0])

    async def _trip(self, flow: Flow, trip: Hashable) -> object:
        sql = self._statements()
        if trip == LEAVE:
            return await self._run(
                flow.key, sql.leave, [stored(flow.key), flow.owner], flow.deadline.at
            )
        self._arm(flow)
        params = self._trip_params(flow, trip)
        rows = await self._run(flow.key, sql.acquire, params, flow.deadline.at)
        return self._queued(trip, rows[0])

    def _statements(self) -> Schema | PermitSchema:
        """The statements of acquire, leave, release and extend: a permit view's own."""
        return self._schema

    def _release_params(self, key: str, held: Held) -> list[object]:
        """The release statement's parameters (a permit is named by its token too)."""
        return [stored(key), held.owner]

    def _trip_params(self, flow: Flow, trip: Hashable) -> list[object]:
        """The acquire statement's parameters for *trip*."""
        return self._acquire_params(flow, trip)

    def _queued(self, trip: Hashable, reply: tuple[object, ...]) -> tuple[object, ...]:
        """*reply* to an acquire; one that put the caller in line starts the listener."""
        if trip == QUEUE and reply[0] != 1:
            self._waiting.listen()
        return reply

    def _forget(self, flow: Flow) -> None:
        """*flow* ended; BackendUnavailable if the close took it out of line meanwhile (the
        close passes on a key handed to it: it is not this caller's)."""
        assert isinstance(flow, PostgresFlow)
        if not self._waiting.forget(flow):
            raise self._closed_error(flow.key)

    def _left_sync(self, flow: Flow) -> None:
        with contextlib.suppress(BackendUnavailable):
            self._forget(flow)
        super()._left_sync(flow)

    async def _left(self, flow: Flow) -> None:
        with contextlib.suppress(BackendUnavailable):
            self._forget(flow)
        trip = flow.leaving()
        if trip is not None:
            with contextlib.suppress(Exception):
                await self._trip(flow, trip)

    def _adopt(self, flow: Flow) -> Grant:
        """The server granted the key: the in-process turn lasts as long as the lease."""
        self._forget(flow)
        grant = flow.grant
        assert grant is not None
        assert grant[2] is not None
        deadline = grant[2]
        now = time.monotonic()
        self._tier.local.extend_sync(flow.key, flow.owner, flow.local[0], max(deadline - now, 1e-6))
        with self._tier.mutex:
            self._tier.held[flow.key] = Held(grant[0], flow.owner, flow.local[0])
        return Grant(grant[0], time.time() + (deadline - now), deadline, grant[3])

    def _end_sync(self, key: str, held: Held) -> bool:
        # sent again on a new connection if its pooled one was dead (a server restart): a
        # first attempt that ran before the reply was lost left its release mark, so the
        # repeat answers "released", never a false LeaseLost
        rows = self._run_sync(key, self._statements().release, self._release_params(key, held))
        return bool(rows[0][0])

    async def _end(self, key: str, held: Held) -> bool:
        rows = await self._run(key, self._statements().release, self._release_params(key, held))
        return bool(rows[0][0])

    def _extend_params(self, key: str, owner: bytes, token: int, ttl: float) -> list[object]:
        return [max(int(ttl * 1000), 1), stored(key), owner, token]

    def _extended(self, key: str, held: Held, ttl: float, sent: tuple[float, float]) -> Grant:
        """The server extended the lease sent at *sent* (wall, monotonic): move the in-process
        turn too; the lease's dates run from the send."""
        self._tier.local.extend_sync(key, held.owner, held.local_token, ttl)
        return Grant(held.token, sent[0] + ttl, sent[1] + ttl)

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        sent = (time.time(), time.monotonic())
        params = self._extend_params(key, owner, token, ttl)
        if not self._run_sync(key, self._statements().extend, params):
            raise self._lost(key, token)
        return self._extended(key, held, ttl, sent)

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        sent = (time.time(), time.monotonic())
        params = self._extend_params(key, owner, token, ttl)
        if not await self._run(key, self._statements().extend, params):
            raise self._lost(key, token)
        return self._extended(key, held, ttl, sent)

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        name = stored(key)
        row = self._run_sync(key, self._schema.statistics, [name, name])[0]
        owner, token, live, waiting = cast("tuple[bytes | None, int | None, bool, int]", row)
        waiting = int(waiting) + local.waiting
        if not live:
            return KeyStatistics(key, False, None, None, waiting)
        return KeyStatistics(key, True, token, bytes(owner) if owner else None, waiting)

    # ------------------------------------------------------------------------ auto-renew

    def _new_renewer(self) -> Renewer:
        from ._background import renew_all

        # idle, the thread looks again when a lease taken now would be due, so taking one never
        # wakes it: a key handed over at a release starts with its claim window, not the TTL
        # (an idle look at the TTL's third would make each hand-off a thread switch)
        idle = min(self._ttl, self._stay_ms / 1000) / 3
        return Renewer(renew_all(self), idle, name="keylock-postgres-renewer", dated=self._renewed)

    def _renewed(self, lease: Lease, ttl: float, sent_wall: float, sent: float) -> Grant:
        """A renewal sent at (*sent_wall*, *sent*) landed: move the in-process turn too
        (LeaseLost if it lapsed meanwhile)."""
        view = lease._host.backend
        if view is not self:  # a permit of one of this backend's views
            return cast("PostgresBackend", view)._renewed(lease, ttl, sent_wall, sent)
        with self._tier.mutex:
            held = self._tier.held.get(lease._full_key)
        if held is None or held.owner != lease._owner:
            raise self._lost(lease.key, lease.token)  # released meanwhile
        return self._extended(lease._full_key, held, ttl, (sent_wall, sent))

    # --------------------------------------------------------------------------- closing

    def _in_line(self) -> list[tuple[str, str, list[object]]]:
        """Close the backend to acquires: those still in line at the server, as the statements
        that take each out of it (a waiter queued by a permit view leaves by its view's)."""
        self._shut = True
        flows = self._waiting.close()
        return [
            (flow.key, flow.leave_sql, [stored(flow.key), flow.owner])
            for flow in flows
            if flow.leaving() is not None
        ]

    def close_sync(self) -> None:
        """Close: acquires in flight raise BackendUnavailable; waiters in line leave it (bounded
        by a few seconds in all); leases still held are no longer renewed."""
        until = time.monotonic() + _LEAVE_AT_CLOSE
        for key, sql, params in self._in_line():
            with contextlib.suppress(Exception):
                self._connections.run_sync(key, sql, params, until)
        self._closing()
        self._stop_renewing()
        self._connections.close_sync()

    async def close(self) -> None:
        until = time.monotonic() + _LEAVE_AT_CLOSE
        for key, sql, params in self._in_line():
            with contextlib.suppress(Exception):
                await self._connections.run(key, sql, params, until)
        self.close_sync()
        await self._connections.close()
