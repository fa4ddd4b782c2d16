"""The Postgres backend's wire: sync and async calls through psycopg pools, and the one place
where a driver error becomes :class:`~keylock.BackendUnavailable` (naming host:port/db, never
the password).

Each call borrows a connection from a pool for one statement, in autocommit (one round trip:
no BEGIN/COMMIT), and keeps no session state (no advisory session lock, no SET, no temp
table): so the pool may be a transaction-mode PgBouncer. The schema is created on the first
call through a wire (``CREATE ... IF NOT EXISTS`` under a transaction-scoped advisory lock, so
concurrent first users do not race), and again if someone dropped it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, cast

import psycopg
import psycopg.errors
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ...errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ._sql import Schema

__all__ = ["AsyncWire", "Rows", "SyncWire", "address", "boundary", "connect_options", "unavailable"]

Rows = list[tuple[object, ...]]
Connection = psycopg.Connection[tuple[object, ...]]
Cursor = psycopg.Cursor[tuple[object, ...]]
AsyncConnection = psycopg.AsyncConnection[tuple[object, ...]]
AsyncCursor = psycopg.AsyncCursor[tuple[object, ...]]
_SCHEMA_LOCK = 72627262  # pg_advisory_xact_lock id serializing keylock's CREATE statements
_MISSING = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction)
_ATTEMPT = 0.5  # seconds a caller whose deadline came waits still, for one connect attempt
_POOL_NAME = "keylock"


def _wait_for(pool: object, until: float | None) -> float:
    """How long a call may wait for a pooled connection: the pool's timeout, cut to the
    caller's deadline (monotonic *until*) plus one connect attempt (none if the last one
    failed: a give-up after a failed try does not wait for the server again)."""
    timeout = cast("float", getattr(pool, "timeout", 30.0))
    if until is None:
        return timeout
    grace = 0.0 if getattr(pool, "connect_error", None) is not None else _ATTEMPT
    return min(timeout, max(until - time.monotonic(), 0.0) + grace)


def _no_connection(pool: object, exc: psycopg_pool.PoolTimeout) -> BaseException:
    """For a pool that got no connection: the last connect attempt's error (connection
    refused, bad password...) if the pool is ours and one failed, else *exc*."""
    error = getattr(pool, "connect_error", None)
    return error if isinstance(error, Exception) else exc


class _Quiet(logging.Filter):
    """psycopg_pool's warning per failed connect attempt of our pools, at debug: the caller's
    BackendUnavailable says it (once, with the cause), not a log line per retry."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            isinstance(args, tuple)
            and args
            and args[0] in (_POOL_NAME, f"{_POOL_NAME}-async")
            and str(record.msg).startswith(("error connecting in", "reconnection attempt"))
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("psycopg.pool").isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("psycopg.pool").addFilter(_Quiet())


class _SyncPool(psycopg_pool.ConnectionPool):
    """A pool that keeps its last connect error (None once a connect succeeds)."""

    connect_error: Exception | None = None

    def _connect(self, timeout: float | None = None) -> Connection:
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            self.connect_error = exc
            raise
        self.connect_error = None
        return conn


class _AsyncPool(psycopg_pool.AsyncConnectionPool):
    """As _SyncPool."""

    connect_error: Exception | None = None

    async def _connect(self, timeout: float | None = None) -> AsyncConnection:
        try:
            conn = await super()._connect(timeout)
        except Exception as exc:
            self.connect_error = exc
            raise
        self.connect_error = None
        return conn


def connect_options(pool: object) -> tuple[str, dict[str, object]]:
    """(conninfo, connection keyword arguments) of a psycopg pool, to open more connections
    like its own (the listener; a sync pool beside an async one, or the reverse)."""
    conninfo = cast("str", getattr(pool, "conninfo", ""))
    kwargs = dict(cast("dict[str, object] | None", getattr(pool, "kwargs", None)) or {})
    return conninfo, kwargs


def address(conninfo: str, kwargs: dict[str, object]) -> str:
    """``host:port/db`` for messages: never the password, the user, or other options."""
    try:
        params = conninfo_to_dict(conninfo, **kwargs)  # type: ignore[arg-type]
    except psycopg.Error:
        return "postgres"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or 5432)
    database = str(params.get("dbname") or params.get("user") or "")
    if host.startswith("/"):
        host = f"unix:{host}"
    return f"{host}:{port}/{database}"


def _password(conninfo: str, kwargs: dict[str, object]) -> str | None:
    try:
        value = conninfo_to_dict(conninfo, **kwargs).get("password")  # type: ignore[arg-type]
    except psycopg.Error:
        return None
    return str(value) if value else None


_FAILURES = (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, OSError)


def unavailable(where: str, key: str, exc: BaseException, secret: str | None) -> BackendUnavailable:
    """A driver's (or the pool's) error as BackendUnavailable: the server, never the secret."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if secret:
        detail = detail.replace(secret, "***")
    return BackendUnavailable(
        f"Postgres at {where} failed for lock {key!r}: {detail}; nothing was granted or "
        "changed by this call; check the server and the URL",
        key=key,
    )


@contextlib.contextmanager
def boundary(where: str, key: str, secret: str | None = None) -> Iterator[None]:
    """Translate psycopg's (and the pool's) errors once, at the boundary."""
    try:
        yield
    except _FAILURES as exc:
        raise unavailable(where, key, exc, secret) from exc


def _dead(exc: psycopg.OperationalError, broken: bool) -> bool:
    """True if the statement may be sent again on another connection (see SyncWire.run)."""
    return broken or isinstance(exc, psycopg.errors.AdminShutdown)


class _Base:
    def __init__(self, schema: Schema, conninfo: str, kwargs: dict[str, object]) -> None:
        self.schema = schema
        self.where = address(conninfo, kwargs)
        self._secret = _password(conninfo, kwargs)
        self._ready = False  # the schema was seen or made through this wire
        self._mutex = threading.Lock()

    def _probe(self) -> str:
        return self.schema.probe


class SyncWire(_Base):
    """Blocking calls through a psycopg ``ConnectionPool``."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        schema: Schema,
        *,
        owned: bool,
    ) -> None:
        super().__init__(schema, *connect_options(pool))
        self.pool = pool
        self.owned = owned  # made by the backend (from_url): opened lazily, closed by it
        self._opened = not owned
        # one cursor per pooled connection, made once: a cursor per statement costs more
        # client time than the rest of a call's bookkeeping
        self._cursors: weakref.WeakKeyDictionary[Connection, Cursor] = weakref.WeakKeyDictionary()

    def run(self, key: str, sql: str, params: Sequence[object], until: float | None = None) -> Rows:
        """Run one statement; its rows (a connection waited for until *until*, plus one
        connect attempt). BackendUnavailable on any failure. A connection found
        dead in the pool (the server restarted, or terminated it) is replaced, and the
        statement sent again on another connection (the pool discards the broken one). Every
        statement is safe to repeat: acquire and leave are idempotent per owner id, extend
        and renew per token, and a release that ran before its reply was lost finds its own
        release mark (see ``_sql``)."""
        try:
            if not self._opened:
                with self._mutex:
                    if not self._opened:
                        self.pool.open(wait=False)
                        self._opened = True
            dead = made = 0
            while True:
                # getconn/putconn rather than pool.connection(): the same checks on return,
                # without a context manager and a commit of an autocommit connection per call
                try:
                    conn = self.pool.getconn(_wait_for(self.pool, until))
                except psycopg_pool.PoolTimeout as exc:
                    raise _no_connection(self.pool, exc) from exc
                restore = False
                try:
                    restore = not conn.autocommit
                    if restore:
                        conn.autocommit = True
                    if not self._ready:
                        self._ensure(conn)
                    cursor = self._cursors.get(conn)
                    if cursor is None:
                        cursor = self._cursors[conn] = conn.cursor()
                    return cursor.execute(sql, params).fetchall()
                except _MISSING:
                    made += 1
                    if made > 1:
                        raise
                    self._ready = False  # dropped under us: make it again, then retry
                except psycopg.OperationalError as exc:
                    dead += 1
                    if not _dead(exc, conn.broken) or dead > self.pool.max_size:
                        raise
                finally:
                    if restore and not conn.closed:
                        conn.autocommit = False
                    self.pool.putconn(conn)
        except _FAILURES as exc:
            raise unavailable(self.where, key, exc, self._secret) from exc

    def _ensure(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        row = conn.execute(self._probe()).fetchone()
        if not (row and row[0]):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in self.schema.ddl:
                    conn.execute(statement)
        self._ready = True

    def close(self) -> None:
        if self.owned and self._opened:
            self.pool.close()


class AsyncWire(_Base):
    """Calls from one event loop through a psycopg ``AsyncConnectionPool``."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool,
        schema: Schema,
        *,
        owned: bool,
    ) -> None:
        super().__init__(schema, *connect_options(pool))
        self.pool = pool
        self.owned = owned
        self._opened = not owned
        self._cursors: weakref.WeakKeyDictionary[AsyncConnection, AsyncCursor] = (
            weakref.WeakKeyDictionary()
        )

    async def run(
        self, key: str, sql: str, params: Sequence[object], until: float | None = None
    ) -> Rows:
        try:
            if not self._opened:
                self._opened = True
                await self.pool.open(wait=False)
            dead = made = 0
            while True:
                try:
                    conn = await self.pool.getconn(_wait_for(self.pool, until))
                except psycopg_pool.PoolTimeout as exc:
                    raise _no_connection(self.pool, exc) from exc
                restore = False
                try:
                    restore = not conn.autocommit
                    if restore:
                        await conn.set_autocommit(True)
                    if not self._ready:
                        await self._ensure(conn)
                    cursor = self._cursors.get(conn)
                    if cursor is None:
                        cursor = self._cursors[conn] = conn.cursor()
                    await cursor.execute(sql, params)
                    return await cursor.fetchall()
                except _MISSING:
                    made += 1
                    if made > 1:
                        raise
                    self._ready = False
                except psycopg.OperationalError as exc:
                    dead += 1
                    if not _dead(exc, conn.broken) or dead > self.pool.max_size:
                        raise
                finally:
                    if restore and not conn.closed:
                        await conn.set_autocommit(False)
                    await self.pool.putconn(conn)
        except _FAILURES as exc:
            raise unavailable(self.where, key, exc, self._secret) from exc

    async def _ensure(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        row = await (await conn.execute(self._probe())).fetchone()
        if not (row and row[0]):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in self.schema.ddl:
                    await conn.execute(statement)
        self._ready = True

    async def close(self) -> None:
        if self.owned and self._opened:
            await self.pool.close()


def sync_pool(
    conninfo: str, kwargs: dict[str, object], size: int, timeout: float
) -> psycopg_pool.ConnectionPool:
    """A pool this backend owns: autocommit connections, opened on first use and grown only
    as calls need them (``min_size=0``: a pre-filled connection would race the first call's
    own, and the pool would start at two)."""
    return _SyncPool(
        conninfo,
        kwargs={**kwargs, "autocommit": True},
        min_size=0,
        max_size=size,
        open=False,
        timeout=timeout,
        name=_POOL_NAME,
    )


def async_pool(
    conninfo: str, kwargs: dict[str, object], size: int, timeout: float
) -> psycopg_pool.AsyncConnectionPool:
    return _AsyncPool(
        conninfo,
        kwargs={**kwargs, "autocommit": True},
        min_size=0,
        max_size=size,
        open=False,
        timeout=timeout,
        name=f"{_POOL_NAME}-async",
    )


def listen_connection(
    conninfo: str, kwargs: dict[str, object], channel: str
) -> psycopg.Connection[tuple[object, ...]]:
    """A dedicated session connection LISTENing on *channel* (a pooler cannot carry it)."""
    options = {name: value for name, value in kwargs.items() if name != "autocommit"}
    conn = psycopg.connect(make_conninfo(conninfo), autocommit=True, **options)  # type: ignore[arg-type]
    conn.execute(f'LISTEN "{channel}"')
    return conn
