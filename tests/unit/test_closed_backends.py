"""A backend used after close() says it is closed (BackendUnavailable naming the backend and
the fix), and grants nothing: not a 'Bad file descriptor' as if the store were down, and not
a silent new connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from keylock import BackendUnavailable, KeyedLock, KeyedSemaphore
from keylock.backends import Backend, FileBackend, PostgresBackend, RedisBackend

from .._pg_server import PgServer
from .._redis_server import Server


def _refuses_after_close(backend: Backend) -> None:
    locks, sem = KeyedLock(backend), KeyedSemaphore(backend, limit=2)
    with locks.sync("k"), sem.sync("k"):
        pass
    backend.close_sync()
    for hold in (locks.sync("k"), locks.sync("new"), sem.sync("k")):
        with pytest.raises(BackendUnavailable, match=r"is closed: it grants nothing"), hold:
            pass
    with pytest.raises(BackendUnavailable, match="is closed"):
        locks.acquire_sync("k", timeout=0)


def test_a_closed_file_backend_says_so(tmp_path: Path) -> None:
    """Fails on the old code: 'cannot open the lock file ...: Bad file descriptor'."""
    _refuses_after_close(FileBackend(tmp_path / "locks"))


def test_a_closed_redis_backend_grants_nothing(redis_server: Server) -> None:
    """Fails on the old code: a call after close() opened a new connection and was granted."""
    _refuses_after_close(RedisBackend.from_url(redis_server.url))


async def test_a_closed_redis_backend_refuses_async_callers_too(redis_server: Server) -> None:
    """Fails on the old code (granted)."""
    backend = RedisBackend.from_url(redis_server.url)
    locks = KeyedLock(backend)
    async with locks("k"):
        pass
    await backend.close()
    with pytest.raises(BackendUnavailable, match="is closed"):
        async with locks("k"):
            pass


def test_a_lock_is_released_after_its_file_backend_closed(tmp_path: Path) -> None:
    """As a permit is (test_file_permits): a held lease is its lock file's own descriptor, so
    its release needs nothing close() ended; refusing it would hold the key until this process
    exits. Another client of the directory takes the key at once."""
    closing = FileBackend(tmp_path / "locks")
    lease = KeyedLock(closing).acquire_sync("k")
    closing.close_sync()
    lease.extend_sync(5)
    lease.release_sync()
    other = FileBackend(tmp_path / "locks")
    try:
        KeyedLock(other).acquire_sync("k", timeout=0).release_sync()
    finally:
        other.close_sync()


def _closed_mid_call(backend: Backend, obj: object, name: str) -> None:
    """Make *obj*'s *name* close *backend* first, then run: a call the close cuts off."""
    original = getattr(obj, name)

    def cut_off(*args: object, **kwargs: object) -> object:
        backend.close_sync()
        return original(*args, **kwargs)

    setattr(obj, name, cut_off)


def test_a_postgres_statement_cut_off_by_close_says_closed(postgres_server: PgServer) -> None:
    """The close lands while a release's statement is on its way: the release says what one
    after close() says. Fails on the old code: "Postgres at ... failed for lock 'k': the
    pool 'keylock' is already closed" (the pool layer noticed first, in its own words)."""
    postgres_server.flush()
    backend = PostgresBackend.from_url(postgres_server.url)
    lease = KeyedLock(backend).acquire_sync("k")
    _closed_mid_call(backend, backend._connections, "run_sync")
    with pytest.raises(BackendUnavailable, match=r"is closed: it grants nothing after close"):
        lease.release_sync()


def test_a_redis_script_cut_off_by_close_says_closed(redis_server: Server) -> None:
    """As for Postgres: the wire the release took was closed under it. Fails on the old code:
    "Redis at ... failed ...: the backend was closed" (the wire's own words)."""
    backend = RedisBackend.from_url(redis_server.url)
    lease = KeyedLock(backend).acquire_sync("k")
    _closed_mid_call(backend, backend._connections.wire(), "call")
    with pytest.raises(BackendUnavailable, match=r"is closed: it grants nothing after close"):
        lease.release_sync()
