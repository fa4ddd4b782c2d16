"""One process's way to the server for a Postgres backend: a sync wire, one async wire per event
loop (or the user's async pool), and one statement at a time through them.

A forked child must not touch its parent's connections: :func:`abandon` keeps them alive and
unused (closing them would end the parent's sessions), and every backend :func:`started` in
the parent makes its state afresh (its ``_after_fork``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import TYPE_CHECKING, Protocol

from . import _wire

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg_pool

    from ._sql import Schema
    from ._wire import AsyncWire, Rows, SyncWire

__all__ = ["Connections", "abandon", "started"]

_ABANDONED: list[object] = []  # a parent's connections in a child: never closed nor collected


class _Forkable(Protocol):
    def _after_fork(self) -> None: ...


_STARTED: weakref.WeakSet[_Forkable] = weakref.WeakSet()  # the backends of this process


def started(backend: _Forkable) -> None:
    """Make *backend* start afresh in a forked child (its ``_after_fork``)."""
    _STARTED.add(backend)


def _after_fork_in_child() -> None:
    for backend in list(_STARTED):
        backend._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Connections:
    """The wires of one backend in one process; made lazily, closed by :meth:`close_sync` and
    :meth:`close` (pools the user passed are left open: they are the user's). A pool made
    after close() would stay open: the backend sends nothing once closed (its ``_run``)."""

    def __init__(
        self,
        schema: Schema,
        conninfo: str,
        connect_kwargs: dict[str, object],
        *,
        user_sync: psycopg_pool.ConnectionPool | None,
        user_async: psycopg_pool.AsyncConnectionPool | None,
        owned_sync: bool,
        pool_size: int,
        timeout: float,
    ) -> None:
        self._schema = schema
        self._conninfo, self._connect_kwargs = conninfo, connect_kwargs
        self._user_sync, self._user_async = user_sync, user_async
        self.owned_sync = owned_sync  # the sync pool was made by from_url: ours to close
        self._pool_size, self._timeout = pool_size, timeout
        self._mutex = threading.Lock()
        self._sync_wire: SyncWire | None = None
        self._async_wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncWire] = (
            weakref.WeakKeyDictionary()
        )
        self._user_async_wire: AsyncWire | None = None

    def sync_wire(self) -> SyncWire:
        wire = self._sync_wire
        if wire is None:
            with self._mutex:
                wire = self._sync_wire
                if wire is None:
                    pool = self._user_sync
                    owned = pool is None or self.owned_sync
                    if pool is None:
                        pool = _wire.sync_pool(
                            self._conninfo, self._connect_kwargs, self._pool_size, self._timeout
                        )
                    wire = self._sync_wire = _wire.SyncWire(pool, self._schema, owned=owned)
        return wire

    def async_wire(self) -> AsyncWire:
        """The wire for the running event loop: the user's async pool, or one pool per loop."""
        if self._user_async is not None:
            if self._user_async_wire is None:
                self._user_async_wire = _wire.AsyncWire(self._user_async, self._schema, owned=False)
            return self._user_async_wire
        loop = asyncio.get_running_loop()
        wire = self._async_wires.get(loop)
        if wire is None:
            pool = _wire.async_pool(
                self._conninfo, self._connect_kwargs, self._pool_size, self._timeout
            )
            wire = self._async_wires[loop] = _wire.AsyncWire(pool, self._schema, owned=True)
        return wire

    def run_sync(
        self, key: str, sql: str, params: Sequence[object], until: float | None = None
    ) -> Rows:
        return self.sync_wire().run(key, sql, params, until)

    async def run(
        self, key: str, sql: str, params: Sequence[object], until: float | None = None
    ) -> Rows:
        """One statement from an event loop; once sent it completes even if the caller is
        cancelled (the caller's give-up must land after it, never before)."""
        call = asyncio.ensure_future(self.async_wire().run(key, sql, params, until))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            # a grant or a place in line this call makes must exist before the caller's LEAVE
            # is sent, or the LEAVE would land first and leave it behind: wait (one statement)
            while not call.done():
                try:
                    await asyncio.shield(call)
                except asyncio.CancelledError:
                    continue
                except Exception:
                    break
            if not call.cancelled():
                call.exception()  # retrieved: its outcome is the LEAVE's business now
            raise

    def close_sync(self) -> None:
        if self._sync_wire is not None:
            self._sync_wire.close()

    async def close(self) -> None:
        """Close the sync pool and the running loop's (other loops' can only be dropped)."""
        self.close_sync()
        wire = self._async_wires.pop(asyncio.get_running_loop(), None)
        if wire is not None:
            await wire.close()


def abandon(connections: Connections) -> None:
    """In a forked child: never use, close or collect the parent's connections."""
    _ABANDONED.append((connections._sync_wire, dict(connections._async_wires)))
