"""RedisBackend on fakeredis clients (issue 16, finding 11): users test their code with them.

The conformance suite runs on the ``redis-fake`` parameter too (tests/conftest.py); these
tests cover what it does not: each kind of client given alone, the twin derived from it, a
decoding client, pub/sub hand-offs, and how the backend names a fake server.
"""

from __future__ import annotations

import asyncio
import threading
import time

import fakeredis
import pytest

from keylock import KeyedLock, LockTimeout
from keylock.backends import RedisBackend


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def test_a_sync_fake_client_serves_both_flavours(server: fakeredis.FakeServer) -> None:
    """A backend given only ``FakeRedis`` takes leases from threads and, through the async
    twin it derives, from a loop; both exclude a second client of the same fake server.
    Fails on the old code (AttributeError: 'FakeSocket' object has no attribute
    'settimeout' at the first acquire)."""
    locks = KeyedLock(RedisBackend(fakeredis.FakeRedis(server=server)))
    other = KeyedLock(RedisBackend(fakeredis.FakeRedis(server=server)))
    first = locks.acquire_sync("job:7", timeout=1)
    with pytest.raises(LockTimeout):
        other.acquire_sync("job:7", timeout=0)
    first.release_sync()

    async def from_a_loop() -> int:
        async with locks("job:7", timeout=1) as second:
            with pytest.raises(LockTimeout):
                await other.acquire("job:7", timeout=0)
            return second.token

    second = asyncio.run(from_a_loop())
    assert second > first.token
    assert other.acquire_sync("job:7", timeout=1).token > second
    locks.close_sync()
    other.close_sync()


async def test_an_async_fake_client_serves_both_flavours(server: fakeredis.FakeServer) -> None:
    """A backend given only ``FakeAsyncRedis`` derives a sync twin on the same fake server
    (for threads, the listener and the renewer). Fails on the old code (the twin was a
    redis-py client looking for a real server named after fakeredis's random host)."""
    locks = KeyedLock(RedisBackend(async_client=fakeredis.FakeAsyncRedis(server=server)))
    other = KeyedLock(RedisBackend(fakeredis.FakeRedis(server=server)))
    held = await asyncio.to_thread(locks.acquire_sync, "job:7", timeout=1)
    with pytest.raises(LockTimeout):
        await other.acquire("job:7", timeout=0)
    await held.release()
    async with locks("job:7", timeout=1) as lease:
        assert lease.token > held.token
    await locks.close()
    await other.close()


def test_a_decoding_fake_client_works(server: fakeredis.FakeServer) -> None:
    """``decode_responses=True`` (the backend talks bytes through a raw twin, on the same fake
    server). Fails on the old code (the AttributeError above)."""
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    locks = KeyedLock(RedisBackend(client))
    with locks.sync("job:é", timeout=1) as lease:
        assert locks.statistics("job:é").token == lease.token
    assert client.keys("*")  # the fencing counter, in the user's fake server
    locks.close_sync()


def test_a_waiter_on_a_fake_server_is_woken_by_the_release(
    server: fakeredis.FakeServer,
) -> None:
    """Hand-offs reach a waiter through fakeredis's pub/sub, not its safety-net poll (30 s
    here). Fails on the old code (the AttributeError above)."""
    holder = KeyedLock(RedisBackend(fakeredis.FakeRedis(server=server), poll=30))
    waiter = KeyedLock(RedisBackend(fakeredis.FakeRedis(server=server), poll=30))
    held = holder.acquire_sync("job:7")
    threading.Timer(0.2, held.release_sync).start()
    started = time.monotonic()
    lease = waiter.acquire_sync("job:7", timeout=10)
    assert time.monotonic() - started < 5
    assert lease.token > held.token
    lease.release_sync()
    holder.close_sync()
    waiter.close_sync()


def test_a_fake_backend_names_no_host() -> None:
    """fakeredis's random host name means nothing to a reader: the backend says fakeredis."""
    backend = RedisBackend(fakeredis.FakeRedis())
    assert repr(backend) == "RedisBackend(fakeredis)"
    backend.close_sync()
