"""A backend that owns threads and connections (Redis, Postgres) and is collected unclosed
warns (ResourceWarning naming it and the fix, as asyncio and aiohttp do); a closed one, one
whose construction failed, a FileBackend (its descriptor is freed) and a MemoryBackend are
collected silently. Finding 9 of issue 16: a
backend made per request leaked 100 threads and 54 connections over 50 requests, silently.
The warning cases fail before the warning existed (no ResourceWarning)."""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from keylock import KeyedLock
from keylock.backends import Backend, FileBackend, MemoryBackend, PostgresBackend, RedisBackend

from .._pg_server import PgServer
from .._redis_server import Server

_FIX = "call close\\(\\) or close_sync\\(\\).*one backend per process"


@pytest.fixture(autouse=True)
def _earlier_garbage_collected() -> None:
    """Collect what earlier tests of this worker left for the collector before a test here
    judges what its own backend leaves (a CI run counted another test's socket here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _used(backend: Backend) -> None:
    """Use *backend* the way a request handler would: it opens what it owns. (Tests pass
    auto_renew=False: a renewer keeps a released lease, so its backend, until it is due.)"""
    locks = KeyedLock(backend)
    locks.acquire_sync("request", timeout=5).release_sync()


def _forget(box: list[Backend]) -> None:
    """Drop the last reference to the backend in *box* and collect it."""
    box.clear()
    gc.collect()


def _collected_silently(make: Callable[[], Backend]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_an_unclosed_redis_backend_warns_and_a_closed_one_does_not(redis_server: Server) -> None:
    box: list[Backend] = [RedisBackend.from_url(redis_server.url, auto_renew=False)]
    _used(box[0])
    with pytest.warns(ResourceWarning, match=f"unclosed RedisBackend\\(.*{_FIX}"):
        _forget(box)

    def closed() -> Backend:
        backend = RedisBackend.from_url(redis_server.url)
        _used(backend)
        backend.close_sync()
        return backend

    _collected_silently(closed)


async def test_an_async_closed_redis_backend_is_collected_silently(redis_server: Server) -> None:
    backend = RedisBackend.from_url(redis_server.url)
    locks = KeyedLock(backend)
    await (await locks.acquire("request", timeout=5)).release()
    await locks.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del locks, backend
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_an_unclosed_postgres_backend_warns_and_a_closed_one_does_not(
    postgres_server: PgServer,
) -> None:
    postgres_server.flush()
    box: list[Backend] = [PostgresBackend.from_url(postgres_server.url, auto_renew=False)]
    _used(box[0])
    # the pool outlives its backend here and is closed by the test: collected, psycopg_pool's
    # own __del__ joins its workers and fails when a worker thread ran that collection
    pool = box[0]._connections.sync_wire().pool  # type: ignore[attr-defined]
    with pytest.warns(ResourceWarning, match=f"unclosed PostgresBackend\\(.*{_FIX}"):
        _forget(box)
    pool.close()

    def closed() -> Backend:
        backend = PostgresBackend.from_url(postgres_server.url)
        _used(backend)
        backend.close_sync()
        return backend

    _collected_silently(closed)


def test_an_unclosed_file_backend_frees_its_descriptor_silently(tmp_path: Path) -> None:
    """FileBackend owns one directory descriptor, which collection frees without loss: no
    warning (a per-request FileBackend costs a directory walk, and leaks nothing)."""
    backend = FileBackend(tmp_path / "locks")
    _used(backend)
    fd, inode = backend._files.fd, os.fstat(backend._files.fd).st_ino
    box: list[Backend] = [backend]
    del backend
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _forget(box)
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    try:  # closed by the collection (the number may have been reused since, for another file)
        still_open = os.fstat(fd).st_ino == inode
    except OSError:
        still_open = False
    assert not still_open


def test_memory_and_half_built_backends_are_collected_silently(tmp_path: Path) -> None:
    _collected_silently(lambda: MemoryBackend())
    with pytest.raises(TypeError):
        RedisBackend()  # no client: refused before it owns anything
    with pytest.raises(ValueError, match="empty"):
        FileBackend("")
    _collected_silently(lambda: MemoryBackend(ttl=5))
