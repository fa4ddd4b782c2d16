"""What a Redis outage says to a semaphore's or an RW lock's caller: the key named as what it
is ("semaphore 'k'", "RW lock 'k'"), as a lock's says "lock 'k'"; never the password."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis

from keylock import BackendUnavailable, KeyedLock, KeyedRWLock, KeyedSemaphore
from keylock.backends import RedisBackend

from .._redis_server import Server, free_port
from .test_redis_outages import silent_server

SECRET = "hunter2-s3cret"

Acquire = Callable[[RedisBackend], Callable[[], object]]

# (what the key is named, a sync acquire of 'job:7' on a backend). No timeout: a refused
# connection is then the wire's error at once (with a deadline, a loaded machine may reach it
# first, and the acquire says "did not answer" instead, as it should).
SYNC: list[tuple[str, Acquire]] = [
    ("lock 'job:7'", lambda b: lambda: KeyedLock(b).acquire_sync("job:7")),
    (
        "semaphore 'job:7'",
        lambda b: lambda: KeyedSemaphore(b, limit=3).acquire_sync("job:7"),
    ),
    ("RW lock 'job:7'", lambda b: lambda: KeyedRWLock(b).acquire_read_sync("job:7")),
    ("RW lock 'job:7'", lambda b: lambda: KeyedRWLock(b).acquire_write_sync("job:7")),
]


def _check(error: BaseException, named: str, port: int) -> None:
    """*error* is the wire's BackendUnavailable naming the key *named*, the server, no secret."""
    assert isinstance(error, BackendUnavailable)
    message = str(error)
    assert f"Redis at 127.0.0.1:{port} failed for {named}: " in message, message
    if not named.startswith("lock "):
        assert " lock '" not in message.replace(f"failed for {named}", ""), message
    assert SECRET not in message
    assert ".;" not in message  # (redis-py's "Connection refused." ends in a stop of its own)


@pytest.mark.parametrize(("named", "acquire"), SYNC, ids=["lock", "sem", "read", "write"])
def test_a_permit_acquire_on_a_redis_that_is_down_names_the_semaphore_or_rw_lock(
    named: str, acquire: Acquire
) -> None:
    """A semaphore or RW lock acquire against a Redis that refuses connections raises the
    wire's BackendUnavailable naming "semaphore 'job:7'" / "RW lock 'job:7'"; a plain lock
    still says "lock 'job:7'". Fails on the old code: every one said "failed for lock
    'job:7'" (the lock's too fails there: "Connection refused.; nothing was granted")."""
    port = free_port()
    backend = RedisBackend.from_url(f"redis://:{SECRET}@127.0.0.1:{port}/0")
    try:
        with pytest.raises(BackendUnavailable) as caught:
            acquire(backend)()
        _check(caught.value, named, port)
    finally:
        backend.close_sync()


async def test_an_async_permit_acquire_on_a_redis_that_is_down_names_it_too() -> None:
    """The same for ``await sem.acquire`` and ``await rw.acquire_write``. Fails on the old
    code ("failed for lock 'job:7'")."""
    port = free_port()
    backend = RedisBackend.from_url(f"redis://:{SECRET}@127.0.0.1:{port}/0")
    calls: list[tuple[str, Awaitable[object]]] = [
        ("semaphore 'job:7'", KeyedSemaphore(backend, limit=2).acquire("job:7")),
        ("RW lock 'job:7'", KeyedRWLock(backend).acquire_write("job:7")),
        ("lock 'job:7'", KeyedLock(backend).acquire("job:7")),
    ]
    try:
        for named, call in calls:
            with pytest.raises(BackendUnavailable) as caught:
                await call
            _check(caught.value, named, port)
    finally:
        await backend.close()


def test_a_black_holed_redis_names_the_semaphore_a_caller_waits_for() -> None:
    """A semaphore acquire with no timeout against a server that never answers fails at the
    socket timeout with the wire's error naming "semaphore 'job:7'" (and the chain leads to
    redis-py's TimeoutError, not to a "lock" message). Fails on the old code ("failed for
    lock 'job:7'")."""
    with silent_server() as port:
        url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
        backend = RedisBackend.from_url(url, socket_timeout=0.3)
        try:
            with pytest.raises(BackendUnavailable) as caught:
                KeyedSemaphore(backend, limit=3).acquire_sync("job:7")
            _check(caught.value, "semaphore 'job:7'", port)
            assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
        finally:
            backend.close_sync()


async def test_release_extend_and_statistics_of_a_permit_after_redis_went_down_name_it() -> None:
    """A semaphore permit and an RW read lock (one key is one kind: two keys) held when Redis
    goes away: their extend, statistics and release (sync and async) raise BackendUnavailable
    naming "semaphore"/"RW lock", never the password; a lock's release still says "lock".
    Fails on the old code (each said "failed for lock 'job:7'")."""
    server = Server()
    server.start()
    redis.Redis.from_url(server.url).config_set("requirepass", SECRET)
    url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    backend = RedisBackend.from_url(url, auto_renew=False)
    try:
        semaphore = KeyedSemaphore(backend, limit=2)
        rw = KeyedRWLock(backend)
        permit = semaphore.acquire_sync("job:7")
        read = await rw.acquire_read("doc:2")
        lock = KeyedLock(backend).acquire_sync("job:7")
        server.stop()
        said: list[tuple[str, BaseException]] = []
        for named, call in (
            ("semaphore 'job:7'", lambda: permit.extend_sync(30)),
            ("semaphore 'job:7'", lambda: semaphore.statistics("job:7")),
            ("semaphore 'job:7'", permit.release_sync),
            ("lock 'job:7'", lock.release_sync),
        ):
            with pytest.raises(BackendUnavailable) as caught:
                await asyncio.to_thread(call)
            said.append((named, caught.value))
        with pytest.raises(BackendUnavailable) as extended:
            await read.extend(30)
        said.append(("RW lock 'doc:2'", extended.value))
        with pytest.raises(BackendUnavailable) as released:
            await read.release()
        said.append(("RW lock 'doc:2'", released.value))
        for named, error in said:
            _check(error, named, server.port)
    finally:
        server.stop()
        await backend.close()
