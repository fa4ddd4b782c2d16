"""How many Postgres sessions one process holds: none for LISTEN unless it waits, and at most
two while it waits (one pooled for statements, one LISTEN session), not one per waiter."""

from __future__ import annotations

import threading
import time

from keylock import KeyedLock, Lease
from keylock.backends import PostgresBackend

from .._pg_server import PgServer


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    """Poll *condition* (a callable) until true or *timeout* passes (bounded, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _sessions(server: PgServer, name: str) -> list[str]:
    """The last statement of every session named *name*."""
    rows = server.execute("SELECT query FROM pg_stat_activity WHERE application_name = %s", (name,))
    return [str(query) for (query,) in rows]


def _listening(server: PgServer, name: str) -> int:
    return sum(1 for query in _sessions(server, name) if query.startswith("LISTEN"))


def _pool_size(locks: KeyedLock) -> int:
    backend = locks.backend
    assert isinstance(backend, PostgresBackend)
    wire = backend._connections._sync_wire
    assert wire is not None
    return int(wire.pool.get_stats()["pool_size"])


def test_a_process_that_never_waits_holds_one_session_and_no_listen(
    postgres_server: PgServer,
) -> None:
    """Acquires that could wait (default timeout) but are granted at once, releases, a
    statistics call: one pooled session, no LISTEN session. Failed before the fix: the pool
    started at two (its pre-filled connection raced the first call's own) and the first
    acquire that could wait started the listener."""
    server = postgres_server
    server.flush()
    locks = KeyedLock(PostgresBackend.from_url(server.url, application_name="never-waits"))
    try:
        for n in range(20):
            locks.acquire_sync(f"free-{n % 3}").release_sync()
        locks.statistics("free-0")
        assert _wait_for(lambda: _sessions(server, "never-waits"))
        assert _listening(server, "never-waits") == 0
        assert _pool_size(locks) == 1
        assert len(_sessions(server, "never-waits")) == 1
    finally:
        locks.close_sync()


def test_a_waiting_process_holds_two_sessions(postgres_server: PgServer) -> None:
    """A process waits for a key another process holds: while it waits it holds two
    sessions, its pooled one and its LISTEN session; it is woken by the release. Failed
    before the fix: three (the pool started at two)."""
    server = postgres_server
    server.flush()
    holder = KeyedLock(PostgresBackend.from_url(server.url))
    waiter = KeyedLock(PostgresBackend.from_url(server.url, application_name="waits"))
    lease = holder.acquire_sync("busy")
    got: list[Lease] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire_sync("busy", timeout=30)))
    try:
        waiter.acquire_sync("warm").release_sync()  # the pool in use before the wait
        thread.start()
        assert _wait_for(lambda: _listening(server, "waits") == 1)
        assert _pool_size(waiter) == 1
        assert len(_sessions(server, "waits")) == 2
        lease.release_sync()
        thread.join(30)
        assert got
        got[0].release_sync()
    finally:
        if thread.is_alive():
            lease.release_sync()
            thread.join(30)
        holder.close_sync()
        waiter.close_sync()
