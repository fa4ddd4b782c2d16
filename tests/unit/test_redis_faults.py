"""RedisBackend under faults of the link and odd clients: lost replies, decoded replies,
event loops that come and go, silent links."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from keylock import KeyedLock, KeylockError, LeaseLost, LockTimeout, SingleFlight
from keylock.backends import RedisBackend
from keylock.backends.redis import _scripts, _wire
from keylock.backends.redis._keys import Layout

from .._redis_server import Server
from ..chaos._proxy import Proxy


def _settled(condition: Callable[[], bool]) -> bool:
    """*condition* holds within 2 s (the server notices a closed connection a moment later)."""
    for _ in range(200):
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def url(redis_server: Server) -> str:
    redis_server.flush()
    return redis_server.url


_cut_after = {"sha": ""}  # the script whose reply the next CutConnection loses


class CutConnection(redis.Connection):
    """A connection whose link drops after a chosen script reached the server (and ran)."""

    def send_command(self, *args: object, **kwargs: object) -> None:
        self.last_sent = args[1] if len(args) > 1 else None
        super().send_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def read_response(self, *args: object, **kwargs: object) -> object:
        if _cut_after["sha"] and self.last_sent == _cut_after["sha"]:
            super().read_response(*args, **kwargs)  # the script ran; its reply is lost
            _cut_after["sha"] = ""
            self.disconnect()  # type: ignore[no-untyped-call]
            raise RedisConnectionError("link cut after the request")
        return super().read_response(*args, **kwargs)


class AsyncCutConnection(redis.asyncio.Connection):
    """The same for redis.asyncio."""

    async def send_command(self, *args: object, **kwargs: object) -> None:
        self.last_sent = args[1] if len(args) > 1 else None
        await super().send_command(*args, **kwargs)

    async def read_response(self, *args: object, **kwargs: object) -> object:
        if _cut_after["sha"] and self.last_sent == _cut_after["sha"]:
            await super().read_response(*args, **kwargs)  # type: ignore[arg-type]
            _cut_after["sha"] = ""
            await self.disconnect()
            raise RedisConnectionError("link cut after the request")
        return await super().read_response(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_release_whose_reply_was_lost_is_not_a_lost_lease(url: str) -> None:
    """Row 32 (adv_14): the link drops after RELEASE ran on the server; the retry finds the key
    free and must report a clean release, not LeaseLost (it did: the retry got 0). A lease
    genuinely lost before its release still raises LeaseLost. Fails on the old code."""
    sync_pool = redis.ConnectionPool.from_url(url, connection_class=CutConnection)
    async_pool = redis.asyncio.ConnectionPool.from_url(url, connection_class=AsyncCutConnection)
    sync_locks = async_locks = KeyedLock(
        RedisBackend(
            redis.Redis(connection_pool=sync_pool),
            async_client=redis.asyncio.Redis(connection_pool=async_pool),
        )
    )
    other = KeyedLock(RedisBackend.from_url(url))
    try:
        sync_locks.acquire_sync("warm-up").release_sync()  # the scripts are on the server now
        for n in range(3):
            lease = sync_locks.acquire_sync(f"cut:{n}")
            _cut_after["sha"] = _scripts.RELEASE.sha
            lease.release_sync()
            assert not _cut_after["sha"]  # the cut happened
            assert not other.statistics(f"cut:{n}").held
            lease = await async_locks.acquire(f"acut:{n}")
            _cut_after["sha"] = _scripts.RELEASE.sha
            await lease.release()
            assert not _cut_after["sha"]
            assert not other.statistics(f"acut:{n}").held
        # handed on to a waiter by the release that lost its reply: still a clean release
        lease = sync_locks.acquire_sync("handed")
        got: list[int] = []
        waiter = threading.Thread(
            target=lambda: got.append(other.acquire_sync("handed", timeout=10).token)
        )
        waiter.start()
        for _ in range(500):  # until the waiter is in line
            if other.statistics("handed").waiting:
                break
            time.sleep(0.01)
        _cut_after["sha"] = _scripts.RELEASE.sha
        lease.release_sync()
        waiter.join(10)
        assert got
        assert got[0] > lease.token
        # a genuinely lost lease (taken over on the server) still raises LeaseLost
        lease = sync_locks.acquire_sync("lost")
        raw = redis.Redis.from_url(url)
        raw.set(Layout("keylock").lock("lost")[0], b"another owner")
        _cut_after["sha"] = _scripts.RELEASE.sha
        with pytest.raises(LeaseLost):
            lease.release_sync()
        raw.close()
    finally:
        _cut_after["sha"] = ""
        await async_locks.close()
        sync_locks.close_sync()
        await other.close()


async def test_without_auto_renew_extend_after_a_long_wait_succeeds(url: str) -> None:
    """Row 33 (adv_23): auto_renew=False, a caller that waited on Redis for part of its TTL:
    extend() after the TTL counted from the start of its wait (but before the Redis lease
    runs out) extends the lease, and the server shows it extended. Fails on 255e40f (extend
    raised LeaseLost from the in-process turn, dated from the start of the wait)."""
    ttl = 1.0
    locks = KeyedLock(RedisBackend.from_url(url, ttl=ttl, auto_renew=False))
    other = KeyedLock(RedisBackend.from_url(url, ttl=ttl, auto_renew=False))
    blocker = await other.acquire("job")
    started = time.monotonic()

    async def release_late() -> None:
        while time.monotonic() < started + 0.6 * ttl:  # the waiter spends 60 % of its TTL
            await asyncio.sleep(0.02)
        await blocker.release()

    releasing = asyncio.create_task(release_late())
    lease = await locks.acquire("job", timeout=10)
    granted = time.monotonic()
    await releasing
    while time.monotonic() < started + ttl + 0.1:  # past the TTL counted from the wait's start
        await asyncio.sleep(0.02)
    assert time.monotonic() < granted + ttl  # the Redis lease is still live
    await lease.extend(5.0)
    assert not lease.lost
    raw = redis.Redis.from_url(url)
    assert raw.get(Layout("keylock").lock("job")[0]) == lease.owner
    assert raw.pttl(Layout("keylock").lock("job")[0]) > 4000
    raw.close()
    await lease.release()
    await locks.close()
    await other.close()


async def test_a_client_that_decodes_responses_works_everywhere(url: str) -> None:
    """Row 34 (adv_30): a client made with decode_responses=True: statistics name the owner,
    a hand-off wakes the waiter by its message (not the safety-net poll, 5 s here), and a
    single flight across two backends gives both callers the outcome. Fails on the old code
    (UnicodeDecodeError in statistics and in the follower; hand-offs waited for the poll)."""
    backends = [
        RedisBackend(redis.Redis.from_url(url, decode_responses=True), poll=5.0) for _ in range(2)
    ]
    locks, other = KeyedLock(backends[0]), KeyedLock(backends[1])
    lease = locks.acquire_sync("job")
    found = other.statistics("job")
    assert found.held
    assert found.owner == lease.owner
    got: list[float] = []

    def wait() -> None:
        other.acquire_sync("job", timeout=10).release_sync()
        got.append(time.monotonic())

    waiter = threading.Thread(target=wait)
    waiter.start()
    for _ in range(500):  # until the waiter is in line
        if other.statistics("job").waiting:
            break
        time.sleep(0.01)
    released = time.monotonic()
    lease.release_sync()
    waiter.join(10)
    assert got
    assert got[0] - released < 2.0  # woken by the hand-off message, not the 5 s poll
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        await asyncio.sleep(0.2)
        return 42

    async def follow() -> int:
        await started.wait()  # the leader is running: this caller follows it from elsewhere
        return await SingleFlight(backends[1]).do("f", work)

    outcomes = await asyncio.gather(SingleFlight(backends[0]).do("f", work), follow())
    assert list(outcomes) == [42, 42]
    await locks.close()
    await other.close()


def test_an_event_loop_that_ends_leaves_no_connection_open(url: str) -> None:
    """Row 28 (adv_15): each event loop gets its own connections; asyncio.run() ending closes
    them, and close() closes the rest. Fails on the old code (+1 server connection per loop,
    never closed)."""
    admin = redis.Redis.from_url(url)

    def ours() -> int:  # (other tests' clients come and go on the same server)
        return sum(1 for client in admin.client_list() if client["name"] == "loops")

    locks = KeyedLock(RedisBackend.from_url(url, client_name="loops"))

    flight = SingleFlight(locks.backend)

    async def answer() -> int:
        return 42

    async def one_call(n: int) -> None:
        async with locks(f"job:{n}"):
            pass
        assert await flight.do(f"flight:{n}", answer) == 42  # (the loop's own client)

    for n in range(20):
        asyncio.run(one_call(n))
    assert _settled(lambda: ours() <= 2)  # the sync connections stay open
    asyncio.run(locks.close())
    assert _settled(lambda: ours() == 0)
    admin.close()


class QuickConnection(redis.asyncio.Connection):
    """A connection class whose *default* socket timeout is 0.5 s, as redis-py's is 5 s: the
    pool's options then name no socket timeout, as with from_url's defaults."""

    def __init__(self, **options: Any) -> None:  # type: ignore[explicit-any]
        options.setdefault("socket_timeout", 0.5)
        super().__init__(**options)


def _quick_backend(url: str) -> RedisBackend:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    pool = redis.asyncio.ConnectionPool(connection_class=QuickConnection, host=host, port=port)
    assert "socket_timeout" not in pool.connection_kwargs
    return RedisBackend(
        redis.Redis.from_url(url, socket_timeout=0.5),
        async_client=redis.asyncio.Redis(connection_pool=pool),
    )


async def test_async_calls_on_a_silent_link_are_bounded_by_the_default_timeout(
    redis_server: Server,
) -> None:
    """Row 15 (adv_19): with the client's default socket timeout (none named in its options),
    async release, extend and acquire(timeout=0) on a link that drops every reply give up
    after that timeout, as their sync twins do. Fails on the old code (they waited forever:
    the async wire read no timeout from the options)."""
    redis_server.flush()
    with Proxy(redis_server.port) as proxy:
        locks = KeyedLock(_quick_backend(proxy.url))
        a = await locks.acquire("job:a")
        b = await locks.acquire("job:b")
        proxy.set(down_drop=True)
        for call in (a.release(), b.extend(10), locks.acquire("job:c", timeout=0)):
            started = time.monotonic()
            with pytest.raises(KeylockError):
                await asyncio.wait_for(call, 10)  # (not TimeoutError: that is the old hang)
            assert time.monotonic() - started < 3.0
        proxy.heal()
        await locks.close()


async def test_waiters_that_give_up_on_a_silent_link_leave_nothing_behind(
    redis_server: Server,
) -> None:
    """Row 29 (adv_35): async acquires that time out on a link that drops every reply leave
    no background task and no socket once the socket timeout has passed. Fails on the old
    code (each left a LEAVE task waiting forever on a connection of its own)."""
    redis_server.flush()
    other = KeyedLock(RedisBackend.from_url(redis_server.url))
    held = await other.acquire("job")
    with Proxy(redis_server.port) as proxy:
        locks = KeyedLock(_quick_backend(proxy.url))
        async with locks("warm"):
            pass
        fds = len(os.listdir("/proc/self/fd"))
        proxy.set(down_drop=True)
        for _ in range(10):
            with pytest.raises(LockTimeout):
                await locks.acquire("job", timeout=0.1)
        loop = asyncio.get_running_loop()
        for _ in range(300):  # bounded: the socket timeout is 0.5 s
            pending = [task for task in _wire.background if task.get_loop() is loop]
            if not pending and len(os.listdir("/proc/self/fd")) <= fds:
                break
            await asyncio.sleep(0.01)
        assert pending == []
        assert len(os.listdir("/proc/self/fd")) <= fds
        proxy.heal()
        await locks.close()
    await held.release()
    await other.close()


def test_a_release_cancelled_at_shutdown_still_frees_the_key(redis_server: Server) -> None:
    """Row 17 (adv_27): asyncio.run's main task is cancelled (Ctrl-C) while a release is on
    its way; asyncio.run then cancels the background task that re-sends it, and the loop's
    end must send it once more: the key is free after asyncio.run returns, not held for its
    TTL. Fails on the old code (the key stayed held, PTTL ~30 s)."""
    redis_server.flush()
    raw = redis.Redis.from_url(redis_server.url)
    with Proxy(redis_server.port) as proxy:

        async def service() -> None:
            locks = KeyedLock(RedisBackend.from_url(proxy.url, ttl=30))
            lease = await locks.acquire("job:7")
            proxy.set(up_delay=0.2)  # the release request is slow to reach the server
            main = asyncio.current_task()
            assert main is not None
            asyncio.get_running_loop().call_later(0.05, main.cancel)  # Ctrl-C mid-release
            await lease.release()

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(service())
        assert not raw.exists(Layout("keylock").lock("job:7")[0])
    raw.close()
